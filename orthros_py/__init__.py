"""orthros: checkpoint, restore and live-migrate real Linux process trees with CRIU."""

__version__ = "0.1.0"

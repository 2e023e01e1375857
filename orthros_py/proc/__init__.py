"""Processes and process trees, read through psutil and /proc."""

"""Networking around a migration: service address moves and gratuitous ARP (``addr``), and the
discovery of a process tree's connections. Netlink through pyroute2, never the ``ip`` command."""

"""Policies: multi-step operations over several hosts, each an explicit state machine.

A policy gets its transport handed in (agent clients, one per host), runs its stages in order,
reports progress through an observer callback, and returns a result or raises an error that
says what failed where and what was rolled back. Policies never print; ``orthros_py.cli``
renders them.

- ``migrate``: move a live process tree, its TCP connections and its service address from one
  host to another (``orthros migrate``).

Importing this package loads none of them; import the module you need.
"""

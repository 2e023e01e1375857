"""Policies: multi-step operations over several hosts, each an explicit state machine.

A policy gets its transport handed in (agent clients, one per host), runs its stages in order,
reports progress through an observer callback, and returns a result or raises an error that
says what failed where and what was rolled back. Policies never print; ``orthros_py.cli``
renders them.

What they share:

- ``engine``: the stage runner (stage order, point of no return, events, timings, the journal
  record before every agent call, host-tagged errors, the retrying undo) and the registry of
  recover functions by journal record kind.
- ``hosts``: the typed agent protocol, ``Host``, and what agents report (``HostFacts``,
  ``TreeFacts``).
- ``steps``: do and undo steps more than one policy takes (locks, addresses, held trees,
  image pushes).
- ``journal``: the generic record a coordinator keeps on its disk (kind, id, hosts by role,
  stage, the policy's own state).

The policies, one module each over those:

- ``migrate``: move a live process tree, its TCP connections and its service address from one
  host to another (``orthros migrate``).

Importing this package loads none of them; import the module you need.
"""

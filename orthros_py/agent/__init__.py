"""The orthros agent: a daemon on every host that runs its part of a migration for callers
holding the cluster key, and the authenticated RPC it speaks.

- ``protocol``: versioned frames (length, JSON header, optional payload), pure encode/decode.
- ``auth``: the cluster key file, HMAC-SHA256, the replay window.
- ``ops``: the fixed table of operations (dump, restore, file transfer, page server, ...).
- ``server``: the threaded TCP daemon (``orthros agent``).
- ``client``: ``AgentClient``, one typed method per operation.

Importing this package loads none of them; import the module you need.
"""

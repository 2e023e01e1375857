"""The orthros agent: a daemon on every host that runs its part of a migration for callers
holding the cluster key, and the authenticated RPC it speaks.

- ``protocol``: versioned frames (length, JSON header, optional payload), pure encode/decode.
- ``auth``: the cluster key file, HMAC-SHA256, the replay window.
- ``state``: what a running agent holds (images root, restored trees, page servers, locks).
- ``table``: the fixed table of operations (``@op``, argument checks) and the dispatch.
- ``ops``: the operations, one module per interface (host, criu, images, net).
- ``server``: the threaded TCP daemon (``orthros agent``).
- ``messages``: the typed results of the operations, shared by the client and the policies.
- ``client``: ``AgentClient``, one typed method per operation.
- ``pagechan``, ``held``, ``optpolicy``: the page channel, trees held stopped after a dump,
  what requests may name.

Importing this package loads none of them; import the module you need.
"""

"""The agent's operations, one module per interface; importing this package registers them all
in ``orthros_py.agent.table.OPS``.

- ``host``: ping, status, check, tree, pids_in_use, kill, resume, cgroup_check,
  cgroup_release.
- ``criu``: dump, restore, page_server, page_server_stop.
- ``lazy``: post-copy migration (dump_lazy, lazy_listen, restore_lazy, lazy_status,
  lazy_source_status, lazy_stop) and dirty_track_close for pre-copy rounds.
- ``images``: list_images, remove_image, recv_file, recv_files, send_file, push_images.
- ``net``: netlock_prepare/lock/unlock/status, addr_list/add/del, garp.
- ``pair``: service protection (pair_*, witness_*).
- ``sync``: synchronized save and restore of several hosts' trees (sync_*).
"""

from orthros_py.agent.ops import criu, host, images, lazy, net, pair, sync

__all__ = ["criu", "host", "images", "lazy", "net", "pair", "sync"]

"""A small process tree for ``orthros inspect`` tests: what a checkpoint of it must show.

The parent listens on 127.0.0.1 (or ::1 with ``--ipv6``), forks a child that connects to it, and
shares a UNIX socketpair with that child; it also binds a named UNIX datagram socket. The parent
sends ``QUEUED`` bytes that the child never reads, so the child's socket has data queued in its
receive queue at dump time. Usage: insp_tree.py READY_FILE UNIX_PATH [--ipv6]
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

QUEUED = 1234


def main() -> None:
    ready_file, unix_path = sys.argv[1], sys.argv[2]
    family, host = ((socket.AF_INET6, "::1") if "--ipv6" in sys.argv[3:]
                    else (socket.AF_INET, "127.0.0.1"))
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    named = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    named.bind(unix_path)
    pair_parent, pair_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    child = os.fork()
    if child == 0:
        listener.close()
        named.close()
        pair_parent.close()
        client = socket.create_connection((host, port))
        pair_child.sendall(b"c")  # tells the parent that the connection is up
        while True:
            time.sleep(3600)
            client.fileno()  # keep the socket referenced

    pair_child.close()
    server, _ = listener.accept()
    pair_parent.recv(1)
    server.sendall(b"x" * QUEUED)  # the child never reads: stays in its receive queue
    tmp = ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"parent": os.getpid(), "child": child, "port": port}, f)
    os.rename(tmp, ready_file)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()

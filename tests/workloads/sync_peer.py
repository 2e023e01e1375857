"""A member that talks to another member: N TCP connections to an echo server, a numbered line
on every connection in turn, each echo checked. Every 0.1 s it writes what it saw to
STATUS_DIR/status.json (a new file renamed over the old: no descriptor stays open on it, and
its content rolls back with the data directory).

Usage: sync_peer.py HOST PORT N STATUS_DIR
status.json: {"rounds": R, "per_conn": [echoes checked on each], "errors": [...], "t": time}
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time


def main() -> None:
    host, port, n, status_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    conns = [socket.create_connection((host, port), timeout=30) for _ in range(n)]
    per_conn = [0] * n
    errors: list[str] = []
    rounds = 0
    last = 0.0
    while True:
        for i, c in enumerate(conns):
            if c is None:
                continue
            line = f"{i}:{per_conn[i]}\n".encode()
            try:
                c.sendall(line)
                got = b""
                while not got.endswith(b"\n"):
                    chunk = c.recv(64)
                    if not chunk:
                        raise ConnectionError("closed by the server")
                    got += chunk
                if got != line:
                    raise ValueError(f"echo {got!r} for {line!r}")
                per_conn[i] += 1
            except (OSError, ValueError) as err:
                errors.append(f"conn {i}: {type(err).__name__}: {err}")
                c.close()
                conns[i] = None  # type: ignore[call-overload]
        rounds += 1
        now = time.time()
        if now - last >= 0.1:
            last = now
            tmp = os.path.join(status_dir, ".status.tmp")
            with open(tmp, "w") as f:
                json.dump({"rounds": rounds, "per_conn": per_conn, "errors": errors, "t": now}, f)
            os.replace(tmp, os.path.join(status_dir, "status.json"))
        time.sleep(0.005)


if __name__ == "__main__":
    main()

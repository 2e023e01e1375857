"""TCP echo server: one thread, selectors, echoes every byte back on the connection it came on.

Prints "listening PORT" once bound, then "accepted N" after each new connection, to stdout.
Usage: echo_server.py [HOST] [PORT]   (PORT 0, the default, lets the kernel choose)
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def say(line: str) -> None:
    os.write(1, f"{line}\n".encode())  # whole lines only, whatever Python's buffering


def main() -> None:
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    sel = selectors.DefaultSelector()
    lsk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsk.bind((host, port))
    lsk.listen(1024)
    lsk.setblocking(False)
    sel.register(lsk, selectors.EVENT_READ)
    say(f"listening {lsk.getsockname()[1]}")
    accepted = 0
    while True:
        for key, _ in sel.select():
            sk = key.fileobj
            assert isinstance(sk, socket.socket)
            if sk is lsk:
                conn, _ = lsk.accept()
                conn.setblocking(True)
                sel.register(conn, selectors.EVENT_READ)
                accepted += 1
                say(f"accepted {accepted}")
                continue
            try:
                data = sk.recv(65536)
            except ConnectionError:
                data = b""
            if not data:
                sel.unregister(sk)
                sk.close()
                continue
            sk.sendall(data)


if __name__ == "__main__":
    main()

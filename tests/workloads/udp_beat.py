"""Heartbeats over UDP between two members, numbered, so that a lost one shows.

    udp_beat.py send LOCAL_IP LOCAL_PORT DEST_IP DEST_PORT   a datagram "N" every 2 ms
    udp_beat.py recv LOCAL_IP LOCAL_PORT STATUS_DIR          drains its socket every 100 ms

The receiver reads in bursts, so that its socket always holds the last ~50 heartbeats: a
snapshot taken at any instant has datagrams waiting. After each burst it writes
STATUS_DIR/status.json (a new file renamed over the old): {"next": N, "received": R,
"missing": [[from, to], ...], "reordered": K}.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time


def send(local: tuple[str, int], dest: tuple[str, int]) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(local)
    n = 0
    while True:
        s.sendto(str(n).encode(), dest)
        n += 1
        time.sleep(0.002)


def recv(local: tuple[str, int], status_dir: str) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind(local)
    s.setblocking(False)
    expect: int | None = None
    received, reordered = 0, 0
    missing: list[list[int]] = []
    while True:
        time.sleep(0.1)
        while True:
            try:
                data = s.recv(64)
            except BlockingIOError:
                break
            n = int(data)
            received += 1
            if expect is not None and n > expect:
                missing.append([expect, n - 1])
            elif expect is not None and n < expect:
                reordered += 1
                continue
            expect = n + 1
        tmp = os.path.join(status_dir, ".status.tmp")
        with open(tmp, "w") as f:
            json.dump({"next": expect, "received": received, "missing": missing,
                       "reordered": reordered}, f)
        os.replace(tmp, os.path.join(status_dir, "status.json"))


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send((sys.argv[2], int(sys.argv[3])), (sys.argv[4], int(sys.argv[5])))
    else:
        recv((sys.argv[2], int(sys.argv[3])), sys.argv[4])

"""The migrate benchmark's echo clients, in a process of their own: ClientPool's connections,
driven round after round (a request on every connection, then every reply read and checked),
so that their Python work does not share an interpreter lock with the migration being measured.

``python -m orthros_py.bench.migrate.echo_clients --host H --port P --clients N`` runs in the
client host's network namespace (``nsenter --net``) and talks in JSON lines: it prints
``{"ready": N}`` once every connection has had five answers; a line ``mark`` on stdin makes
the longest wait count from then on (``{"marked": true}``); ``stop`` (or the end of stdin) ends
the rounds and prints the figures: requests, errors, the longest wait, samples of the errors.
Interfaces: TCP sockets, stdin and stdout. No privileges of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import struct
import sys
import threading
import time
from typing import Any

from orthros_py.workloads.echo import ClientPool


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orthros_py.bench.migrate.echo_clients")
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--interval", type=float, default=0.005)
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args(argv)
    try:
        pool = ClientPool(args.host, args.port, args.clients, timeout=args.timeout)
    except OSError as err:
        _say({"error": f"cannot connect {args.clients} clients: {err}"})
        return 1
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            pool.round()
            stop.wait(args.interval)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while pool.stats.requests < 5 * args.clients:
        if time.monotonic() > deadline or not thread.is_alive():
            _say({"error": f"only {pool.stats.requests} answers after 60 s"})
            return 1
        time.sleep(0.01)
    _say({"ready": args.clients})
    for line in sys.stdin:
        if line.strip() == "mark":
            pool.stats.max_gap_s = 0.0  # the rounds before were the warm-up
            _say({"marked": True})
        elif line.strip() == "stop":
            break
    stop.set()
    thread.join(max(3.0, 20 * args.interval))
    s = pool.stats
    errors, samples = s.errors, list(s.error_samples)
    if thread.is_alive():
        # A round still waits for replies that should have come long ago: a failure.
        errors += 1
        samples.insert(0, "a round of requests was still unanswered at the end")
    slow: dict[str, Any] = {}
    if s.slowest_conn is not None:
        # The connection that held the longest round up, from its own TCP_INFO: how often
        # it retransmitted (a wait out of the client's backoff) and where it is.
        sk = pool.socks[s.slowest_conn]
        with contextlib.suppress(OSError):
            raw = sk.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            slow = {"conn": s.slowest_conn, "port": sk.getsockname()[1],
                    "total_retrans": struct.unpack_from("=I", raw, 100)[0],
                    "ca_state": raw[1], "backoff": raw[4],
                    "ended_s_before_stop": round(time.monotonic() - s.slowest_at, 3)}
    _say({"requests": s.requests, "errors": errors, "max_gap_s": s.max_gap_s,
          "samples": samples, "slowest": slow})
    for sk in pool.socks:
        with contextlib.suppress(OSError):
            sk.shutdown(2)  # wakes a round blocked in recv
    thread.join(10)
    pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

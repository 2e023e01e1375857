"""Run inside the client VM: N echo connections to ADDR:PORT with a request on every one every
INTERVAL, until DIR/stop appears. DIR/status.json (rewritten atomically every 0.3 s and at the
end) holds the correct echoes per connection, the errors and the longest wait, which is how the
controller sees, per connection, that a migration lost nothing.

    python guest_clients.py ADDR PORT N DIR
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from orthros_py.workloads.echo import ClientPool


def write(path: Path, pool: ClientPool, done: bool) -> None:
    s = pool.stats
    doc = {"answered": pool.answered(), "requests": s.requests, "errors": s.errors,
           "error_samples": s.error_samples, "max_gap_s": s.max_gap_s, "done": done}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def main() -> None:
    addr, port, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    out.mkdir(parents=True, exist_ok=True)
    status = out / "status.json"
    pool = ClientPool(addr, port, n, timeout=60)
    pool.start(interval=0.05)
    try:
        while not (out / "stop").exists():
            write(status, pool, False)
            time.sleep(0.3)
    finally:
        pool.close()
        write(status, pool, True)


if __name__ == "__main__":
    main()

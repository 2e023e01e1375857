"""A process that holds what a real service holds and CRIU needs an option for, and reports it.

Modes (each prints "ready ..." once set up, then a line per tick about what it holds):
  locks DIR        flock(LOCK_EX) on DIR/flock.lock and a POSIX (fcntl) lock on DIR/posix.lock
  inotify DIR      opens DIR/watched, links it as DIR/watched.hard, watches it with inotify and
                   unlinks DIR/watched: "event WD MASK" for each event it reads
  ghost DIR SIZE   writes SIZE random bytes to DIR/scratch, unlinks it, keeps it open:
                   "check SHA256 LEN" from reading it back
  device PATH      holds PATH (a character device) open for writing: "wrote N"
  volume SRC DST HOST_MNTNS
                   in a mount namespace of its own (run under ``unshare --mount``), binds SRC on
                   DST: "marker TEXT" from DST/marker
  listen           a TCP listener on 127.0.0.1 that never accepts: "listening PORT"
  memory MIB       MIB of anonymous memory filled with a pattern: "memory ok|BAD"

Usage: holder.py MODE ARGS... [INTERVAL_SECONDS is fixed at 0.05]
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import socket
import struct
import subprocess
import sys
import time

TICK = 0.05


def say(line: str) -> None:
    os.write(1, f"{line}\n".encode())  # whole lines only


def locks(d: str) -> None:
    a = open(os.path.join(d, "flock.lock"), "w")  # noqa: SIM115 - held until killed
    fcntl.flock(a, fcntl.LOCK_EX)
    b = open(os.path.join(d, "posix.lock"), "w")  # noqa: SIM115
    fcntl.lockf(b, fcntl.LOCK_EX)
    say("ready")
    n = 0
    while True:
        say(f"holding {n}")
        n += 1
        time.sleep(TICK)


def inotify(d: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    path = os.path.join(d, "watched")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    os.link(path, path + ".hard")  # a rotated log, a file replaced by rename: linked elsewhere
    ifd = libc.inotify_init1(os.O_NONBLOCK)
    in_modify, in_close_write, in_delete_self = 0x2, 0x8, 0x400
    wd = libc.inotify_add_watch(ifd, path.encode(), in_modify | in_close_write | in_delete_self)
    if wd < 0:
        raise OSError(ctypes.get_errno(), "inotify_add_watch")
    os.unlink(path)
    say(f"ready {wd} {fd}")
    while True:
        try:
            buf = os.read(ifd, 4096)
        except BlockingIOError:
            buf = b""
        off = 0
        while off < len(buf):
            w, mask, _cookie, length = struct.unpack_from("iIII", buf, off)
            off += 16 + length
            say(f"event {w} {mask:#x}")
        time.sleep(TICK)


def ghost(d: str, size: int) -> None:
    path = os.path.join(d, "scratch")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    data = os.urandom(size)
    os.write(fd, data)
    os.unlink(path)
    say(f"ready {hashlib.sha256(data).hexdigest()}")
    del data
    while True:
        got = os.pread(fd, size + 1, 0)
        say(f"check {hashlib.sha256(got).hexdigest()} {len(got)}")
        time.sleep(TICK * 4)


def device(path: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    say("ready")
    n = 0
    while True:
        n += os.write(fd, b"x")
        say(f"wrote {n}")
        time.sleep(TICK)


def volume(src: str, dst: str, host_mntns: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ns_worker import reopen_stdio

    from orthros_py.workloads.unixpair import prune_mounts

    reopen_stdio()
    prune_mounts(host_mntns)
    subprocess.run(["mount", "--bind", src, dst], check=True)
    say("ready")
    while True:
        with open(os.path.join(dst, "marker")) as f:
            say(f"marker {f.read().strip()}")
        time.sleep(TICK)


def listen() -> None:
    lsk = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsk.bind(("127.0.0.1", 0))
    lsk.listen(16)
    say(f"listening {lsk.getsockname()[1]}")
    while True:
        time.sleep(TICK)


def memory(mib: int) -> None:
    pattern = os.urandom(4096)
    buf = bytearray(pattern * (mib * 256))
    say("ready")
    while True:
        ok = buf[-4096:] == pattern and buf[:4096] == pattern
        say(f"memory {'ok' if ok else 'BAD'}")
        time.sleep(TICK)


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "locks":
        locks(args[0])
    elif mode == "inotify":
        inotify(args[0])
    elif mode == "ghost":
        ghost(args[0], int(args[1]))
    elif mode == "device":
        device(args[0])
    elif mode == "volume":
        volume(args[0], args[1], int(args[2]))
    elif mode == "listen":
        listen()
    elif mode == "memory":
        memory(int(args[0]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()

"""A process that holds a userfaultfd of its own (as a VM monitor or a live-migrating runtime
does), and a page registered on it, then sleeps: a tree orthros's own memory tracking cannot
share. Prints "ready FD" once it holds it.

Interfaces: userfaultfd(2) (x86-64 syscall 323) and the UFFDIO_API / UFFDIO_REGISTER ioctls
through ctypes. Needs root or vm.unprivileged_userfaultfd=1.
Usage: uffd_holder.py
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import platform
import struct
import time

SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
O_CLOEXEC = 0o2000000
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api): 24 bytes
UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register): 32 bytes
UFFDIO_REGISTER_MODE_MISSING = 1


def say(line: str) -> None:
    os.write(1, f"{line}\n".encode())


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(SYS_USERFAULTFD[platform.machine()], O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd: {os.strerror(err)}")
    fcntl.ioctl(fd, UFFDIO_API, bytearray(struct.pack("QQQ", UFFD_API, 0, 0)))
    # One page registered, never touched: nothing ever waits on the fd.
    area = mmap.mmap(-1, mmap.PAGESIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(area))
    fcntl.ioctl(fd, UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", addr, mmap.PAGESIZE,
                                                          UFFDIO_REGISTER_MODE_MISSING, 0)))
    say(f"ready {fd}")
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()

"""Another process's file descriptors, copied into ours: ``pidfd_getfd(2)`` (Linux 5.6+) on a
``pidfd_open(2)`` descriptor. The copy shares the open file (a socket's options set through it
are the socket's); the process's own descriptors are untouched.

Needs PTRACE_MODE_ATTACH over the process (root: CAP_SYS_PTRACE).
"""

from __future__ import annotations

import ctypes
import os
import platform

from orthros_py.errors import OrthrosError

# pidfd_getfd is 438 on every architecture that has the unified syscall table (Linux 5.6+).
_SYS_PIDFD_GETFD = {"x86_64": 438, "aarch64": 438, "riscv64": 438, "ppc64le": 438,
                    "s390x": 438}
_libc = ctypes.CDLL(None, use_errno=True)


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A copy of descriptor ``fd`` of the process ``pidfd`` refers to; OSError as the kernel
    says (EBADF: no such descriptor; ESRCH: the process is gone)."""
    nr = _SYS_PIDFD_GETFD.get(platform.machine())
    if nr is None:
        raise OrthrosError(f"pidfd_getfd is not known on {platform.machine()}")
    got = int(_libc.syscall(nr, pidfd, fd, 0))
    if got < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return got

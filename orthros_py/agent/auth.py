"""Authentication of agent RPC frames: the cluster key file, HMAC-SHA256, and the replay window.

Interfaces: the filesystem (the key file; writing one needs write access to its directory,
usually root for /etc/orthros) and the wall clock (``time.time``: timestamps are compared across
hosts, so the hosts' clocks must agree within the window, as NTP keeps them). The crypto is
Python's ``hmac``, ``hashlib`` and ``secrets``; nothing here needs privileges.

Every host of a cluster shares one random key (like corosync's authkey). Whoever holds it can
ask any agent to dump, restore and kill process trees as root: guard it like a root password.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import os
import secrets
import stat
import string
import threading
import time
from collections.abc import Callable
from pathlib import Path

from orthros_py.agent.errors import KeyFileError, Refusal, ReplayError

KEY_BYTES = 32  # as long as SHA-256's output: longer keys add nothing to HMAC-SHA256
MAX_KEY_BYTES = 4096
DEFAULT_KEY_PATH = Path("/etc/orthros/authkey")
# Requests are accepted while |now - ts| <= window; their nonces are remembered as long.
REPLAY_WINDOW = 30.0
MAX_NONCES = 200_000  # ~6,600 requests/s sustained over a 30 s window: far above any migration
# Domain separation: a MAC made for this protocol is never valid for anything else.
_MAC_PREFIX = b"orthros-agent-rpc\x00"
_HEX = frozenset(string.hexdigits)


def sign(key: bytes, message: bytes) -> str:
    """HMAC-SHA256 of ``message`` under ``key``, as 64 lowercase hex digits."""
    return hmac.new(key, _MAC_PREFIX + message, hashlib.sha256).hexdigest()


def verify(key: bytes, message: bytes, mac: str) -> bool:
    """Constant-time check of ``mac`` (so timing does not reveal how much of it matched)."""
    return hmac.compare_digest(sign(key, message), mac)


def new_nonce() -> str:
    return secrets.token_hex(16)


# --- key files ---------------------------------------------------------------------------------


def parse_key(data: bytes, where: str = "the key") -> bytes:
    """The key in a key file's bytes: 32+ raw bytes, or 64+ hex digits (one line of text)."""
    text = data.strip()
    if len(text) >= 2 * KEY_BYTES and len(text) % 2 == 0 and all(chr(c) in _HEX for c in text):
        return bytes.fromhex(text.decode())
    if len(data) < KEY_BYTES:
        raise KeyFileError(f"{where} holds {len(data)} bytes: a cluster key needs at least "
                           f"{KEY_BYTES} random bytes", hint="make one with 'orthros keygen'")
    if len(data) > MAX_KEY_BYTES:
        raise KeyFileError(f"{where} holds {len(data)} bytes, more than a key "
                           f"({MAX_KEY_BYTES} at most)")
    return data


def load_key(path: Path) -> bytes:
    """Read the cluster key; refuse a file that others may read or write (as ssh does)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError as err:
        raise KeyFileError(f"no cluster key at {path}",
                           hint="make one with 'orthros keygen --out PATH' and copy it to every "
                                "host") from err
    except OSError as err:
        raise KeyFileError(f"cannot open the cluster key {path}: {err.strerror}") from err
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"the cluster key {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"the cluster key {path} is open to others (mode {stat.S_IMODE(st.st_mode):04o})",
                hint=f"chmod 600 {path}")
        data = f.read(MAX_KEY_BYTES + 1)
    return parse_key(data, f"the cluster key {path}")


def write_key(path: Path, *, force: bool = False) -> Path:
    """Write a fresh random key to ``path`` with mode 0600; refuse to replace one unless
    ``force``. The file appears whole or not at all (written beside it, then renamed)."""
    path = path.absolute()
    if path.exists() and not force:
        raise KeyFileError(f"{path} already exists",
                           hint="use --force to replace it; every host then needs the new key")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
    except OSError as err:
        raise KeyFileError(f"cannot write a key into {path.parent}: {err.strerror}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if someone made the file meanwhile: never overwrite
    except FileExistsError as err:
        raise KeyFileError(f"{path} already exists", hint="use --force to replace it") from err
    except OSError as err:
        raise KeyFileError(f"cannot write the key {path}: {err.strerror}") from err
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --- replay window -----------------------------------------------------------------------------


class ReplayGuard:
    """Refuses requests whose timestamp is outside ``now ± window``, and nonces seen before.

    A nonce need only be remembered while its timestamp is inside the window: afterwards the
    timestamp check refuses the frame anyway. So memory stays bounded by the request rate. A
    restarted agent starts with an empty cache: a request captured within ``window`` seconds
    before the restart could be replayed once until then (the price of keeping nonces in memory
    only). Thread-safe.
    """

    def __init__(self, window: float = REPLAY_WINDOW, *, max_nonces: int = MAX_NONCES,
                 clock: Callable[[], float] = time.time) -> None:
        if window <= 0:
            raise ValueError("the replay window must be positive")
        self.window = window
        self.max_nonces = max_nonces
        self.clock = clock
        self._seen: dict[str, float] = {}  # nonce -> when it may be forgotten
        self._expiry: list[tuple[float, str]] = []  # heap of the same, oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def _prune(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            _, nonce = heapq.heappop(self._expiry)
            self._seen.pop(nonce, None)

    def check(self, ts: float, nonce: str) -> None:
        """Accept (and remember) a request, or raise ReplayError saying why not. Call it only
        for frames whose MAC verified, so that forgers cannot fill the cache."""
        now = self.clock()
        if not math.isfinite(ts):
            raise ReplayError("the request's timestamp is not a number")
        skew = now - ts
        if skew > self.window:
            raise ReplayError(
                f"the request is {skew:.1f} s old, beyond the {self.window:g} s replay window",
                hint="a replayed request, or this host's clock is behind the caller's "
                     "(keep the hosts' clocks in sync with NTP)")
        if -skew > self.window:
            raise ReplayError(
                f"the request is dated {-skew:.1f} s in the future, beyond the {self.window:g} s "
                "replay window",
                hint="this host's clock is ahead of the caller's (keep the hosts' clocks in sync "
                     "with NTP)")
        with self._lock:
            self._prune(now)
            if nonce in self._seen:
                raise ReplayError("the request was replayed: its nonce was already used",
                                  hint="each request must be signed afresh")
            if len(self._seen) >= self.max_nonces:
                raise ReplayError(f"too many requests within {self.window:g} s "
                                  f"({self.max_nonces} remembered)", code=Refusal.BUSY)
            forget_at = ts + self.window
            self._seen[nonce] = forget_at
            heapq.heappush(self._expiry, (forget_at, nonce))

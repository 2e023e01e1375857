"""Locating the CRIU binary and reading its version. Needs nothing but PATH."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass

from orthros_py.errors import MissingFeatureError
from orthros_py.run import run

MIN_VERSION = (4, 2)
FIX = "run 'make setup' to build CRIU 4.2 or newer"


@dataclass(frozen=True)
class CriuBinary:
    path: str
    version: tuple[int, ...]

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))


def parse_version(text: str) -> tuple[int, ...] | None:
    """Parse ``criu --version`` output ("Version: 4.2.1" plus an optional GitID line)."""
    m = re.search(r"^Version:\s*(\d+(?:\.\d+)*)", text, re.MULTILINE)
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def find_criu(min_version: tuple[int, ...] = MIN_VERSION) -> CriuBinary:
    """Return the CRIU on PATH, or raise MissingFeatureError saying why it will not do."""
    path = shutil.which("criu") or shutil.which("criu", path="/usr/local/sbin:/usr/sbin:/sbin")
    if path is None:
        raise MissingFeatureError("CRIU is not installed", hint=FIX)
    version = parse_version(run([path, "--version"], timeout=10).stdout)
    if version is None:
        raise MissingFeatureError(f"cannot read the version of {path}", hint=FIX)
    if version < min_version:
        have = ".".join(map(str, version))
        need = ".".join(map(str, min_version))
        raise MissingFeatureError(
            f"CRIU {have} at {path} is too old: orthros needs {need} or newer on this kernel",
            hint=FIX,
        )
    return CriuBinary(path, version)

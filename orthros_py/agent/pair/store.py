"""The standby's generation store: incremental checkpoints of one protected service ("pair").

The active host checkpoints the service every interval; each checkpoint (a generation) arrives
here as a CRIU image directory under the agent's images root, ``<pair>.g<NNNNNN>``, whose pages
marked "in parent" live in the previous generation (``parent -> ../<pair>.g<previous>``, the
link CRIU's ``--prev-images-dir`` makes). A generation counts only once committed: verified
complete and named by ``<pair>.committed``, a small JSON file replaced by rename. At most
``keep`` committed generations are kept; the oldest goes after the next one has been merged
with it (``imagechain.materialize``), so storage stays bounded and the newest committed
generation always restores.

Plain files under the images root: needs write access there, no root, no CRIU binary. One writer
per pair (the agent holds one store per pair); the methods of one store are serialized.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthros_py.agent.errors import ProtocolError
from orthros_py.agent.protocol import validate_name
from orthros_py.criu.imagechain import (
    PARENT_LINK,
    TMP_SUFFIX,
    VerifyResult,
    fsync_dir,
    fsync_file,
    materialize,
    pages_stats,
    referenced_pages_files,
    remove_temp_files,
    verify,
)
from orthros_py.errors import BadImageError

# Beside CRIU's images in a committed generation: its Generation record (CRIU ignores it).
META = "orthros-generation.json"
POINTER_SUFFIX = ".committed"
# An oldest generation on its way out is renamed to this first, so that a crash in the middle
# of deleting it never leaves a half-deleted directory under a generation's name.
TRASH_SUFFIX = ".trash"
_RESERVED = frozenset({"generation", "dir", "committed_at"})


class GenerationError(BadImageError):
    """A request the generation store cannot honour: an old or unknown generation number, a
    generation that was never begun, a pointer that names nothing."""


@dataclass(frozen=True)
class Generation:
    number: int
    dir: str  # its directory's name under the images root
    committed_at: float  # unix time
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"generation": self.number, "dir": self.dir, "committed_at": self.committed_at,
                **self.stats}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Generation:
        stats = {k: v for k, v in data.items() if k not in _RESERVED}
        return cls(int(data["generation"]), validate_name(data["dir"]),
                   float(data["committed_at"]), stats)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` by rename, its content durable first: a reader sees old or new."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with tmp.open("w") as f:
        json.dump(data, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(path.parent)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise GenerationError(f"{path} cannot be read: {err}") from err
    if not isinstance(data, dict):
        raise GenerationError(f"{path} is corrupt: it holds no JSON object")
    return data


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(dirpath, name))
                total += st.st_size
    return total


class GenerationStore:
    """The committed generations of one pair on the standby, and the one being received.

    Crash safety. The pointer only ever names a generation that was verified and fsynced before
    the pointer's rename, and that generation's chain (its parent links) is only ever changed
    by ``materialize``, which at every instant leaves each directory it rewrites complete and
    with the same page contents (see there). The order in ``commit``:
      1. verify the new generation against its chain; fsync its files, its record, the dir;
      2. rename the pointer onto it: the commit point;
      3. prune, oldest first: merge the second-oldest with the oldest (materialize: its pages in
         parent copied into it, then its parent link removed), and only then rename the oldest
         to ``*.trash`` and delete it. Nothing still links to the oldest by then.
    Dying anywhere leaves the pointer on a restorable generation, plus at most temp files, an
    unreferenced pages file, a ``*.trash`` directory, an uncommitted directory or one
    generation too many: ``recover`` removes them and finishes the pruning.
    """

    def __init__(self, root: Path, pair: str, keep: int) -> None:
        validate_name(pair, "pair name")
        # The longest name the store makes for this pair must be valid too.
        validate_name(f"{pair}.g000000{TRASH_SUFFIX}", "pair name")
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        self.root = Path(root)
        self.pair = pair
        self.keep = keep
        self._dir_re = re.compile(rf"{re.escape(pair)}\.g(\d{{6,}})")
        self._trash_re = re.compile(rf"{re.escape(pair)}\.g\d{{6,}}{re.escape(TRASH_SUFFIX)}")
        self._lock = threading.RLock()
        self.now: Callable[[], float] = time.time  # when a generation counts as committed

    # --- names ---------------------------------------------------------------------------

    def dir_name(self, k: int) -> str:
        if k < 1:
            raise GenerationError(f"generation numbers start at 1, not {k}")
        return validate_name(f"{self.pair}.g{k:06d}")

    def path(self, k: int) -> Path:
        return self.root / self.dir_name(k)

    @property
    def pointer(self) -> Path:
        return self.root / f"{self.pair}{POINTER_SUFFIX}"

    def _dirs(self) -> dict[int, Path]:
        """Every generation directory of this pair, committed or not, by number."""
        out: dict[int, Path] = {}
        if not self.root.is_dir():
            return out
        for p in self.root.iterdir():
            m = self._dir_re.fullmatch(p.name)
            if m and p.is_dir() and not p.is_symlink():
                out[int(m.group(1))] = p
        return dict(sorted(out.items()))

    # --- reading -------------------------------------------------------------------------

    def latest(self) -> Generation | None:
        """The newest committed generation, as the pointer names it."""
        data = _read_json(self.pointer)
        if data is None:
            return None
        try:
            return Generation.from_dict(data)
        except (KeyError, TypeError, ValueError, ProtocolError) as err:
            raise GenerationError(f"{self.pointer} is corrupt: {err}") from err

    def _committed(self, latest: Generation | None) -> dict[int, Path]:
        # Committed: at most the pointer's number, and its record written (before the pointer
        # moved). A directory without one was begun and given up.
        if latest is None:
            return {}
        return {k: p for k, p in self._dirs().items()
                if k <= latest.number and (p / META).is_file()}

    def generations(self) -> list[Generation]:
        """The committed generations, oldest first."""
        with self._lock:
            latest = self.latest()
            out = []
            for k, p in self._committed(latest).items():
                if latest is not None and k == latest.number:
                    out.append(latest)
                    continue
                data = _read_json(p / META)
                if data is None:
                    continue
                try:
                    out.append(Generation.from_dict(data))
                except (KeyError, TypeError, ValueError, ProtocolError) as err:
                    raise GenerationError(f"{p / META} is corrupt: {err}") from err
            return out

    def bytes_used(self) -> int:
        """Bytes in every file of this pair: generations committed or begun, and the pointer."""
        total = sum(_tree_size(p) for p in self._dirs().values())
        with contextlib.suppress(FileNotFoundError):
            total += self.pointer.stat().st_size
        return total

    # --- writing -------------------------------------------------------------------------

    def begin(self, k: int, *, incremental: bool = True) -> Path:
        """Create the directory for generation ``k``, linked to the newest committed one, and
        return it. Any other begun-but-uncommitted generation (a transfer given up) goes.

        ``incremental=False`` makes a full generation, without a parent link: what a dump
        without memory tracking needs, since CRIU (4.2.1) refuses to dump into a directory
        whose parent it cannot check for pid reuse ("Pid-reuse detection failed: no parent
        inventory": the parent's inventory records the dump time only with track_mem)."""
        with self._lock:
            latest = self.latest()
            if latest is not None and k <= latest.number:
                raise GenerationError(
                    f"generation {k} of {self.pair} is not newer than the committed "
                    f"generation {latest.number}")
            name = self.dir_name(k)
            self._remove_uncommitted(latest)
            self.root.mkdir(parents=True, exist_ok=True)
            d = self.root / name
            d.mkdir()
            if latest is not None and incremental:
                # Relative, as CRIU writes it for --prev-images-dir ../NAME (which then finds
                # it there and keeps it).
                os.symlink(f"../{latest.dir}", d / PARENT_LINK)
            fsync_dir(d)
            fsync_dir(self.root)
            return d

    def commit(self, k: int, stats: dict[str, Any] | None = None, *,
               prune: bool = True) -> Generation:
        """Make begun generation ``k`` the newest committed one (see the class for the order
        and why it is crash safe), then drop the generations beyond ``keep`` (unless
        ``prune`` is False: then ``prune()`` does it later)."""
        stats = dict(stats or {})
        clash = (_RESERVED | {"images"}) & stats.keys()
        if clash:
            raise ValueError(f"stats may not set {sorted(clash)}: the store sets them")
        with self._lock:
            latest = self.latest()
            if latest is not None and k <= latest.number:
                raise GenerationError(
                    f"generation {k} of {self.pair} is not newer than the committed "
                    f"generation {latest.number}")
            d = self.path(k)
            if not d.is_dir():
                raise GenerationError(f"generation {k} of {self.pair} was never begun")
            self._check_parent(d, latest)
            self._place(d)
            result = self._verify(d)
            self._fsync_generation(d)
            gen = Generation(k, d.name, self.now(), {
                **stats, "images": {**pages_stats(d).to_dict(), "pages_total": result.pages,
                                    "chain": len(result.chain)}})
            _write_json(d / META, gen.to_dict())
            _write_json(self.pointer, gen.to_dict())  # the commit point
            self._remove_uncommitted(gen)
            if prune:
                self._prune(gen)
            return self.latest() or gen

    @contextlib.contextmanager
    def reading(self) -> Iterator[Generation | None]:
        """The newest committed generation, kept as it is (no commit, prune or merge) while
        the caller reads it (a restore)."""
        with self._lock:
            yield self.latest()

    def prune(self) -> None:
        """Drop the committed generations beyond ``keep`` (merging, as ``commit`` does)."""
        with self._lock:
            latest = self.latest()
            if latest is not None:
                self._prune(latest)

    def abort(self, k: int) -> None:
        """Remove begun generation ``k`` (nothing if it is not there); never a committed one."""
        with self._lock:
            latest = self.latest()
            if k in self._committed(latest):
                raise GenerationError(f"generation {k} of {self.pair} is committed: it cannot "
                                      "be aborted")
            d = self.path(k)
            if d.exists():
                self._delete(d)

    def destroy(self) -> None:
        """Remove every generation of this pair and its pointer: nothing of the pair is left."""
        with self._lock:
            # The pointer first: from then on no half-deleted generation is ever named.
            for p in (self.pointer, self.pointer.with_name(self.pointer.name + TMP_SUFFIX)):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            if not self.root.is_dir():
                return
            fsync_dir(self.root)
            for p in self.root.iterdir():
                if self._dir_re.fullmatch(p.name) or self._trash_re.fullmatch(p.name):
                    self._rmtree(p)

    def recover(self) -> dict[str, Any]:
        """At agent start: remove what an interrupted run left (begun generations, temp
        files, unreferenced pages files, trash) and finish pruning. Returns what was done."""
        with self._lock:
            done: dict[str, Any] = {"removed_dirs": [], "removed_files": []}
            tmp = self.pointer.with_name(self.pointer.name + TMP_SUFFIX)
            if tmp.exists():
                tmp.unlink()
                done["removed_files"].append(tmp.name)
            if not self.root.is_dir():
                return done
            for p in self.root.iterdir():
                if self._trash_re.fullmatch(p.name):
                    self._rmtree(p)
                    done["removed_dirs"].append(p.name)
            latest = self.latest()
            if latest is not None and not (self.root / latest.dir).is_dir():
                raise GenerationError(
                    f"{self.pointer} names generation {latest.number} ({latest.dir}), which "
                    "is missing", hint="remove the pair's store (destroy) and protect anew")
            done["removed_dirs"] += self._remove_uncommitted(latest)
            for p in self._committed(latest).values():
                done["removed_files"] += [f"{p.name}/{n}" for n in remove_temp_files(p)]
                done["removed_files"] += [f"{p.name}/{n}" for n in self._remove_orphans(p)]
            if latest is not None:
                self._prune(latest)
            return done

    # --- internals -----------------------------------------------------------------------

    def _check_parent(self, d: Path, latest: Generation | None) -> None:
        """A begun directory with a parent link must still lean on the newest committed
        generation: its pages in parent were sent against that one. Without a link it is a
        full generation (``verify`` finds any page it claims in parent)."""
        link = d / PARENT_LINK
        if not link.is_symlink() and not link.exists():
            return
        have = os.readlink(link) if link.is_symlink() else "a directory"
        if latest is None or (d / have).resolve() != (self.root / latest.dir).resolve():
            raise GenerationError(
                f"generation {d.name} has parent {have} where the newest committed "
                f"generation is {latest.dir if latest else 'none'}")

    def _verify(self, d: Path) -> VerifyResult:
        """The whole chain of ``d`` checked (``imagechain.verify``)."""
        return verify(d)

    def _place(self, d: Path) -> None:
        """Where a received generation's files go before it is verified and committed: they
        stay where the page server wrote them (the paging store moves pages to memory)."""

    def _fsync_generation(self, d: Path) -> None:
        # The page server and the agent wrote these without fsync: make them durable before
        # the pointer can name them.
        for p in d.iterdir():
            if p.is_file() and not p.is_symlink():
                fsync_file(p)
        fsync_dir(d)

    def _remove_uncommitted(self, latest: Generation | None) -> list[str]:
        committed = self._committed(latest)
        removed = []
        for k, p in self._dirs().items():
            if k not in committed:
                self._delete(p)
                removed.append(p.name)
        return removed

    def _remove_orphans(self, d: Path) -> list[str]:
        """Pages files no pagemap names: left by a materialize cut short."""
        keep = referenced_pages_files(d)
        removed = []
        for p in d.glob("pages-*.img"):
            if p.name not in keep:
                p.unlink()
                removed.append(p.name)
        return removed

    def _prune(self, latest: Generation) -> None:
        committed = self._committed(latest)
        while len(committed) > self.keep:
            oldest = next(iter(committed))
            gone = committed.pop(oldest)
            # Every generation leaning on the oldest (the next one, by construction) is merged
            # with it first; only then is the oldest unreachable and deleted.
            for k, p in committed.items():
                link = p / PARENT_LINK
                if link.is_symlink() and link.resolve() == gone.resolve():
                    materialize(p)
                    self._refresh_stats(k, p, latest)
            self._delete(gone)

    def _refresh_stats(self, k: int, d: Path, latest: Generation) -> None:
        data = _read_json(d / META)
        if data is None:
            return
        images = dict(data.get("images") or {})
        images.update(pages_stats(d).to_dict(), chain=1)
        data["images"] = images
        _write_json(d / META, data)
        if k == latest.number:  # keep=1: the pointer's own generation was merged
            _write_json(self.pointer, data)

    def _delete(self, d: Path) -> None:
        trash = d.with_name(d.name + TRASH_SUFFIX)
        self._rmtree(trash)
        os.rename(d, trash)
        fsync_dir(self.root)
        self._rmtree(trash)

    @staticmethod
    def _rmtree(p: Path) -> None:
        if p.is_symlink() or p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        elif p.exists():
            shutil.rmtree(p)

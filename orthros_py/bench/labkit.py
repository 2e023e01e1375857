"""Small pieces every lab benchmark uses: an error in one phrase, a bounded wait, the agents'
logs kept before the lab's teardown removes them, and the record of a run (when it started and
ended, whether it was interrupted, its notes, its outputs written however it ends). No
privileges of their own."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orthros_py.errors import OrthrosError

if TYPE_CHECKING:
    from orthros_py.lab import Lab


def reason(err: BaseException) -> str:
    """What went wrong, as a benchmark's table records it."""
    if isinstance(err, OrthrosError):
        return err.msg
    return f"{type(err).__name__}: {err}"


def wait_until(cond: Callable[[], object], timeout: float, what: str, *,
               every: float = 0.02, stage: str | None = None) -> None:
    """Poll ``cond`` every ``every`` s; OrthrosError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise OrthrosError(f"timed out after {timeout:g} s waiting for {what}", stage=stage)
        time.sleep(every)


def keep_agent_logs(lab: Lab | None, dest: Path) -> None:
    """The agents' logs into ``dest`` (the lab's teardown removes its directory); appended, so
    a lab rebuilt within a run keeps its predecessor's logs."""
    if lab is None:
        return
    for h in lab.hosts:
        if h.agent_log is None or not h.agent_log.exists():
            continue
        with contextlib.suppress(OSError):
            dest.mkdir(parents=True, exist_ok=True)
            with (dest / f"{h.name}-agent.log").open("ab") as f:
                f.write(h.agent_log.read_bytes())


def now() -> str:
    """This moment, as benchmark records keep it (local time, seconds)."""
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")


@contextlib.contextmanager
def recorded(res: Any, out: Path, notes_for: Callable[[Any], list[str]],
             write: Callable[[Any, Path], object]) -> Iterator[None]:
    """A benchmark run's record ``res`` (``started``, ``finished``, ``wall_s``,
    ``interrupted``, ``notes``) kept around the body, and its outputs written to ``out``
    however the run ends: an interrupted run keeps what it measured."""
    res.started = now()
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        res.interrupted = True
        raise
    finally:
        res.finished = now()
        res.wall_s = round(time.monotonic() - t0, 1)
        res.notes = notes_for(res)
        with contextlib.suppress(Exception):
            write(res, out)

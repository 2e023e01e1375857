"""The cgroup freezer's pure parts: labels, cgroup.events, kernel versions, which hierarchy it
picks from a mount table, and what a group directory's files say (a fake one in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orthros_py.cgroup import freezer
from orthros_py.cgroup.freezer import (
    PREFIX,
    FreezeGroup,
    Stamp,
    check_label,
    kernel_at_least,
    v2_events_frozen,
)
from orthros_py.cgroup.fs import CgroupError


@pytest.mark.parametrize("good", ["a", "node-1", "0", "x" * 48, "sync-2024-06-01t10"])
def test_good_labels(good: str) -> None:
    assert check_label(good) == good
    assert len(PREFIX + good) <= 255


@pytest.mark.parametrize("bad", ["", "A", "a_b", "a.b", "a/b", "x" * 49, " a", "é", "a\n"])
def test_bad_labels(bad: str) -> None:
    with pytest.raises(ValueError):
        check_label(bad)


def test_events_frozen_field() -> None:
    assert v2_events_frozen("populated 1\nfrozen 1\n") is True
    assert v2_events_frozen("populated 0\nfrozen 0\n") is False
    assert v2_events_frozen("populated 1\n") is None


@pytest.mark.parametrize(("release", "ok"), [
    ("5.2.0", True), ("6.18.44-fc-v509", True), ("5.10.0-28-amd64", True),
    ("5.1.21", False), ("4.19.0-26-amd64", False), ("nonsense", False)])
def test_kernel_version(release: str, ok: bool) -> None:
    assert kernel_at_least(release, (5, 2)) is ok


def test_stamp_and_group_dicts() -> None:
    st = Stamp(1, 2, 3)
    assert st.to_dict() == {"requested_ns": 1, "written_ns": 2, "settled_ns": 3}
    g = FreezeGroup(Path("/sys/fs/cgroup/a"), 2, owned=False)
    assert g.to_dict() == {"path": "/sys/fs/cgroup/a", "version": 2, "owned": False}


@pytest.fixture
def layout(monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    table: dict[str, Path] = {}
    monkeypatch.setattr(freezer, "mounts", lambda: dict(table))
    monkeypatch.setattr(freezer, "_v2_freezes", lambda mount: True)
    return table


def test_prefers_v2_then_v1_freezer(layout: dict[str, Path]) -> None:
    layout.update({"freezer": Path("/sys/fs/cgroup/freezer"), "cpu,cpuacct": Path("/c"),
                   "": Path("/sys/fs/cgroup/unified")})
    assert freezer._hierarchy() == (2, "", Path("/sys/fs/cgroup/unified"))
    assert freezer._hierarchy(1) == (1, "freezer", Path("/sys/fs/cgroup/freezer"))
    del layout[""]
    assert freezer._hierarchy()[0] == 1
    with pytest.raises(CgroupError, match="v2"):
        freezer._hierarchy(2)


def test_co_mounted_v1_freezer_is_found(layout: dict[str, Path]) -> None:
    layout["devices,freezer"] = Path("/sys/fs/cgroup/devices,freezer")
    assert freezer._hierarchy() == (1, "devices,freezer", Path("/sys/fs/cgroup/devices,freezer"))


def test_no_freezer_at_all(layout: dict[str, Path]) -> None:
    layout["memory"] = Path("/sys/fs/cgroup/memory")
    with pytest.raises(CgroupError):
        freezer._hierarchy()
    with pytest.raises(ValueError):
        freezer._hierarchy(3)


def fake_group(d: Path, files: dict[str, str]) -> Path:
    d.mkdir()
    for name, text in {"cgroup.procs": "", **files}.items():
        (d / name).write_text(text)
    return d


def test_at_tells_versions_by_their_files(tmp_path: Path) -> None:
    v2 = fake_group(tmp_path / "v2", {"cgroup.controllers": "", "cgroup.freeze": "1",
                                      "cgroup.events": "populated 0\nfrozen 1\n"})
    v1 = fake_group(tmp_path / "v1", {"freezer.state": "FREEZING\n",
                                      "freezer.self_freezing": "1\n"})
    g2, g1 = FreezeGroup.at(v2, owned=True), FreezeGroup.at(str(v1), owned=False)
    assert (g2.version, g2.owned, g1.version, g1.owned) == (2, True, 1, False)
    assert g2.is_frozen() and not g1.is_frozen()  # FREEZING is not frozen yet
    assert g2._self_frozen() and g1._self_frozen()
    assert g2.pids() == [] and g1.pids() == []
    with pytest.raises(CgroupError, match="not a cgroup"):
        FreezeGroup.at(tmp_path, owned=False)
    with pytest.raises(CgroupError, match="not a cgroup"):
        FreezeGroup.at(tmp_path / "absent", owned=False)


def test_release_of_a_gone_group_does_nothing(tmp_path: Path) -> None:
    FreezeGroup(tmp_path / "gone", 2, owned=True).release()
    FreezeGroup(tmp_path / "gone", 1, owned=False).release()


# A fake group's control file is a regular file: each write lands after the previous one, so
# its text is the log of what was written. The state read back is scripted.

def scripted(monkeypatch: pytest.MonkeyPatch, states: list[str], last: str) -> list[str]:
    seen: list[str] = []

    def read(fd: int) -> str:
        state = states.pop(0) if states else last
        seen.append(state)
        return state

    monkeypatch.setattr(freezer, "_read_fd", read)
    return seen


def test_v1_freezing_is_written_again_then_thawed_and_refrozen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(freezer, "_V1_REWRITE_S", 0.0)
    monkeypatch.setattr(freezer, "_V1_CYCLE_S", 0.05)
    d = fake_group(tmp_path / "v1", {"freezer.state": ""})
    seen: list[str] = []
    log = d / "freezer.state"

    def read(fd: int) -> str:  # frozen once a thaw-and-refreeze happened
        state = "FROZEN" if "THAWEDFROZEN" in log.read_text() else "FREEZING"
        seen.append(state)
        return state

    monkeypatch.setattr(freezer, "_read_fd", read)
    st = FreezeGroup(d, 1, owned=True).freeze(timeout=30)
    text = log.read_text()
    assert text.startswith("FROZENFROZEN") and text.endswith("THAWEDFROZEN")
    assert seen[-1] == "FROZEN"
    assert st.requested_ns <= st.written_ns <= st.settled_ns


def test_v1_freeze_timeout_leaves_it_thawed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = fake_group(tmp_path / "v1", {"freezer.state": ""})
    scripted(monkeypatch, [], last="FREEZING")
    with pytest.raises(CgroupError, match="did not freeze"):
        FreezeGroup(d, 1, owned=True).freeze(timeout=0.05)
    assert (d / "freezer.state").read_text().endswith("THAWED")


def test_v2_freeze_timeout_leaves_it_thawed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = fake_group(tmp_path / "v2", {"cgroup.controllers": "", "cgroup.freeze": "",
                                     "cgroup.events": ""})
    scripted(monkeypatch, [], last="populated 1\nfrozen 0\n")
    with pytest.raises(CgroupError, match="did not freeze"):
        FreezeGroup(d, 2, owned=True).freeze(timeout=0.05)
    assert (d / "cgroup.freeze").read_text() == "10"


def test_v2_thaw_waits_for_frozen_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = fake_group(tmp_path / "v2", {"cgroup.controllers": "", "cgroup.freeze": "",
                                     "cgroup.events": ""})
    seen = scripted(monkeypatch, ["populated 1\nfrozen 1\n"] * 3, last="populated 1\nfrozen 0\n")
    st = FreezeGroup(d, 2, owned=False).thaw()
    assert (d / "cgroup.freeze").read_text() == "0"
    assert len(seen) == 4 and st.written_ns <= st.settled_ns
    scripted(monkeypatch, [], last="populated 1\nfrozen 1\n")
    with pytest.raises(CgroupError, match="did not thaw"):
        FreezeGroup(d, 2, owned=False).thaw(timeout=0.05)

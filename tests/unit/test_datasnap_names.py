"""Pure parts of orthros_py.host.datasnap: names, the default store layout, the record."""

from __future__ import annotations

from pathlib import Path

import pytest

from orthros_py.errors import ExitStatus, OrthrosError
from orthros_py.host.datasnap import (
    RESERVED,
    DataSnapError,
    DataSnapshot,
    Method,
    check_name,
    human,
    store_for,
)


@pytest.mark.parametrize("name", ["a", "A1", "etcd-0", "snap_2024.01.02", "9", "x" * 64])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "-x", "_x", "a/b", "a b", "x" * 65,
                                  "é", "a\n", "a:b"])
def test_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="bad"):
        check_name(name)


def test_store_layout(tmp_path: Path) -> None:
    src = tmp_path / "members" / "etcd-0.data"
    assert store_for(src, "s1", "etcd-0") == tmp_path / "members" / RESERVED / "s1" / "etcd-0" / "etcd-0.data"
    # ".." is resolved: the store is beside the directory it names.
    assert store_for(tmp_path / "x" / ".." / "d", "s", "m") == tmp_path / RESERVED / "s" / "m" / "d"
    with pytest.raises(ValueError):
        store_for(src, "s1", "../evil")
    with pytest.raises(ValueError):
        store_for(src, "s/1", "m")


def test_record_round_trip() -> None:
    snap = DataSnapshot("/srv/etcd", "/srv/.orthros-sync/s/m/etcd", Method.REFLINK, 123, 4,
                        5.5, None)
    d = snap.to_dict()
    assert d["method"] == "reflink"
    assert DataSnapshot.from_dict(d) == snap
    warned = DataSnapshot("/a", "/b", Method.COPY, 1 << 30, 1, 1.0, "a full copy")
    assert DataSnapshot.from_dict(warned.to_dict()) == warned
    assert Method("btrfs-subvolume") is Method.SUBVOLUME


def test_error_class() -> None:
    err = DataSnapError("the data directory /x does not exist", hint="give the directory")
    assert isinstance(err, OrthrosError)
    assert err.exit_status is ExitStatus.BAD_IMAGE
    assert str(err) == "the data directory /x does not exist (give the directory)"
    back = OrthrosError.from_dict(err.to_dict())
    assert type(back) is DataSnapError and back.hint == "give the directory"


def test_human() -> None:
    assert human(0) == "0 B"
    assert human(1023) == "1023 B"
    assert human(1536) == "1.5 KiB"
    assert human(int(1.2 * (1 << 30))) == "1.2 GiB"
    assert human(3 << 40) == "3.0 TiB"

"""Parsing object metadata is total (issue 11 item 4): pure logic, no S3."""

from __future__ import annotations

import stat

import pytest

from hybridfs.core.attrs import Defaults, Stat, metadata_for, stat_from_object
from hybridfs.tiers.s3 import ObjectInfo

DEFAULTS = Defaults(uid=7, gid=8)
LAST_MODIFIED = 1_650_000_000 * 10**9


def parse(meta: dict[str, str], *, is_dir: bool = False) -> tuple[Stat, list[str]]:
    problems: list[str] = []
    st = stat_from_object(ObjectInfo("k", 3, "e", LAST_MODIFIED, meta), DEFAULTS, is_dir=is_dir,
                          problems=problems)
    return st, problems


@pytest.mark.parametrize("name", ["mode", "uid", "gid", "mtime", "ctime", "atime"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400", "1e3", "junk", "", " ", "0x10", "1_000",
                                   "9" * 400, "18446744073709551616", "١٢٣"])
def test_unusable_values_give_defaults_and_a_problem(name: str, value: str) -> None:
    st, problems = parse({name: value})
    assert (st.mode, st.uid, st.gid, st.mtime_ns) == (stat.S_IFREG | 0o644, 7, 8, LAST_MODIFIED)
    assert (st.ctime_ns, st.atime_ns) == (None, None)
    assert len(problems) == 1 and problems[0].startswith(f"{name}=")


@pytest.mark.parametrize(("name", "value"), [
    ("uid", "-1"), ("gid", "-5"), ("uid", "4294967295"), ("gid", "4294967296"), ("mode", "-420"),
    ("mode", str(0o177777 + 1)), ("mode", str(0o170000 | 0o644)),  # S_IFMT all ones: no such type
    ("mtime", str(2**63)), ("atime", "-" + str(2**63)), ("mtime", "10000000000000000000.5"),
])
def test_out_of_range_values_give_defaults(name: str, value: str) -> None:
    st, problems = parse({name: value})
    assert (st.mode, st.uid, st.gid, st.mtime_ns) == (stat.S_IFREG | 0o644, 7, 8, LAST_MODIFIED)
    assert len(problems) == 1


def test_one_bad_value_leaves_the_good_ones() -> None:
    st, problems = parse({"mode": str(stat.S_IFREG | 0o600), "uid": "1e400", "gid": "12", "mtime": "inf"})
    assert (st.mode, st.uid, st.gid, st.mtime_ns) == (stat.S_IFREG | 0o600, 7, 12, LAST_MODIFIED)
    assert [p.split("=")[0] for p in problems] == ["uid", "mtime"]


def test_valid_values_as_s3fs_and_rclone_write_them() -> None:
    st, problems = parse({"mode": str(stat.S_IFIFO | 0o640), "uid": "0", "gid": "4294967294",
                          "mtime": "1700000000.123456789", "ctime": "1700000001", "atime": "-86400.5"})
    assert problems == []
    assert (st.mode, st.uid, st.gid) == (stat.S_IFIFO | 0o640, 0, 4294967294)
    assert st.mtime_ns == 1_700_000_000_123_456_789
    assert st.ctime_ns == 1_700_000_001 * 10**9 and st.changed_ns == st.ctime_ns
    assert st.atime_ns == -86_400_500_000_000 and st.accessed_ns == st.atime_ns
    assert parse({"mtime": "1700000000.5"})[0].mtime_ns == 1_700_000_000_500_000_000
    assert parse({"mode": "420"})[0].mode == stat.S_IFREG | 0o644  # permission bits only: a regular file
    assert parse({"mode": "448"}, is_dir=True)[0].mode == stat.S_IFDIR | 0o700


def test_devices_carry_rdev_and_round_trip() -> None:
    st, problems = parse({"mode": str(stat.S_IFCHR | 0o600), "rdev": str((1 << 8) | 3)})
    assert problems == [] and st.rdev == 259
    again, _ = parse(metadata_for(st))
    assert (again.mode, again.rdev) == (st.mode, 259)
    bad, problems = parse({"mode": str(stat.S_IFBLK | 0o600), "rdev": "-1"})
    assert bad.rdev == 0 and len(problems) == 1
    assert parse({"mode": str(stat.S_IFREG | 0o600), "rdev": "junk"})[1] == []  # ignored on other types


def test_times_round_trip_and_ctime_follows_data_changes() -> None:
    st = Stat(mode=stat.S_IFREG | 0o644, uid=1, gid=2, size=3, mtime_ns=5 * 10**9)
    assert metadata_for(st) == {"mode": str(stat.S_IFREG | 0o644), "uid": "1", "gid": "2", "mtime": "5"}
    assert st.changed_ns == st.accessed_ns == st.mtime_ns  # nothing stored: both follow the mtime
    chmodded = st.with_(ctime_ns=9 * 10**9, atime_ns=4 * 10**9)
    meta = metadata_for(chmodded)
    assert (meta["ctime"], meta["atime"]) == ("9", "4")
    written = chmodded.with_(mtime_ns=12 * 10**9)  # a write after the chmod: the change time moves too
    assert written.changed_ns == 12 * 10**9 and metadata_for(written)["ctime"] == "12"

"""The comparison behind `vmloader snapshot diff`, on fake trees."""
import json
import stat

import pytest

from vmloader.bootstrapper import snapshotdiff
from vmloader.bootstrapper.errors import SnapshotError
from vmloader.bootstrapper.snapshotdiff import Change, Diff, Entry, Throttled, compare
from vmloader.bootstrapper.snapshots import Snapshot, SnapshotMeta

REG, DIR, LNK = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777


def f(size=10, mode=REG, mtime=1, ctime=1, uid=0, target=None) -> Entry:
    kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}[stat.S_IFMT(mode)]
    return Entry(kind, size, mode, uid, 0, mtime, ctime, target)


BASE = {"/": f(mode=DIR), "/etc": f(mode=DIR), "/etc/motd": f(286), "/etc/issue.net": f(20),
        "/etc/passwd": f(900), "/bin": f(7, LNK, target="usr/bin"), "/work": f(mode=DIR)}


def test_an_identical_tree_has_no_changes():
    assert compare(BASE, dict(BASE)) == snapshotdiff.Diff()


def test_added_changed_and_removed_files_are_listed_with_sizes():
    snap = dict(BASE)
    snap["/work/created"] = f(3, mtime=5, ctime=5)
    snap["/etc/motd"] = f(288, mtime=5, ctime=5)
    del snap["/etc/issue.net"]
    snap["/work"] = f(4096, DIR, mtime=5, ctime=5)       # follows from the add: not a change of its own
    diff = compare(BASE, snap)
    assert diff.to_dict() == {
        "added": [{"path": "/work/created", "type": "file", "size": 3}],
        "changed": [{"path": "/etc/motd", "type": "file", "size": 288, "old_size": 286,
                     "fields": ["size", "mtime_ns", "ctime_ns"]}],
        "removed": [{"path": "/etc/issue.net", "type": "file", "size": 20}]}
    assert diff.lines() == ["D /etc/issue.net", "C /etc/motd", "A /work/created"]


def test_same_size_rewrite_with_mtime_put_back_is_caught_by_ctime():
    snap = dict(BASE, **{"/etc/passwd": f(900, ctime=9)})        # e.g. `touch -r` after rewriting
    assert [(c.path, c.fields) for c in compare(BASE, snap).changed] == [("/etc/passwd", ("ctime_ns",))]


def test_type_owner_mode_and_link_target_changes():
    snap = dict(BASE, **{"/bin": f(9, LNK, target="usr/sbin", ctime=2), "/etc/passwd": f(900, stat.S_IFREG | 0o600, ctime=2),
                         "/etc": f(mode=DIR, uid=1000), "/etc/motd": f(mode=DIR)})
    changed = {c.path: c.fields for c in compare(BASE, snap).changed}
    assert changed == {"/bin": ("size", "target", "ctime_ns"), "/etc/passwd": ("mode", "ctime_ns"),
                       "/etc": ("uid",), "/etc/motd": ("type",)}
    assert "C /etc/" in compare(BASE, snap).lines()


def test_a_removed_directory_lists_its_contents_and_ends_in_a_slash():
    snap = {p: e for p, e in BASE.items() if not p.startswith("/etc")}
    assert compare(BASE, snap).lines() == ["D /etc/", "D /etc/issue.net", "D /etc/motd", "D /etc/passwd"]


def test_progress_is_quiet_at_first_then_throttled(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(snapshotdiff.time, "monotonic", lambda: clock[0])
    seen = []
    throttled = Throttled(seen.append, after=2, every=2)
    throttled("early")
    clock[0] = 102.5
    throttled("late")
    throttled("too soon")
    clock[0] = 105
    throttled("later")
    assert seen == ["late", "later"]


def test_an_evicted_base_is_reported_before_anything_is_opened(tmp_path):
    meta = SnapshotMeta(id="job-1", created=1.0, image="debian-12@12.x", image_sha256="a" * 64,
                        base_path=str(tmp_path / "gone.qcow2"), command=["true"], exit_status=0,
                        outcome="succeeded", user="alice", hostname="w1")
    with pytest.raises(SnapshotError, match="base image of snapshot job-1") as caught:
        snapshotdiff.diff(Snapshot(meta, tmp_path), base_present=False)
    assert "images pull" in caught.value.hint


def test_what_every_boot_writes_is_hidden_only_when_asked():
    snap = dict(BASE, **{"/etc/hostname": f(10), "/usr/lib/vmloader/vmloader/__pycache__": f(mode=DIR),
                         "/usr/lib/vmloader/vmloader/__pycache__/protocol.cpython-311.pyc": f(9),
                         "/usr/lib/vmloader/vmloader/protocol.py": f(9)})
    assert compare(BASE, snap, snapshotdiff.is_boot_noise).lines() == ["A /usr/lib/vmloader/vmloader/protocol.py"]
    assert len(compare(BASE, snap).added) == 4


def test_guest_names_cannot_forge_lines_in_text_but_stay_exact_in_json():
    name = "/work/new\nA /etc/passwd\x1b[2J" + b"\xff".decode("utf-8", "surrogateescape")
    diff = Diff(added=(Change(name, "file", 1),))
    assert diff.lines() == ["A /work/new\\nA /etc/passwd\\x1b[2J\\xff"]
    text = json.dumps(diff.to_dict())
    assert "\n" not in text and "\x1b" not in text and text.isascii()
    assert json.loads(text)["added"][0]["path"].encode("utf-8", "surrogateescape") == \
        b"/work/new\nA /etc/passwd\x1b[2J\xff"

import pytest

from vmloader.bootstrapper.errors import SnapshotError
from vmloader.bootstrapper.snapshots import SnapshotMeta, SnapshotStore, should_keep


def meta(snap_id="job-1", status=1):
    return SnapshotMeta(id=snap_id, created=1.0, image="debian-12@12.x", image_sha256="a" * 64,
                        base_path="/base", command=["false"], exit_status=status, outcome="failed",
                        user="alice", hostname="worker1", timings={"exec": 1.5})


@pytest.mark.parametrize("policy, failed, kept", [
    ("always", False, True), ("always", True, True), ("on-failure", True, True),
    ("on-failure", False, False), ("never", True, False)])
def test_policy_decides_what_is_kept(policy, failed, kept):
    assert should_keep(policy, failed) is kept


def test_preserve_moves_the_overlay_and_keeps_metadata(tmp_path):
    overlay = tmp_path / "overlay.qcow2"
    overlay.write_bytes(b"qcow")
    inode = overlay.stat().st_ino
    console = tmp_path / "console.log"
    console.write_text("boot log")
    store = SnapshotStore(tmp_path / "snaps")
    snap = store.preserve(meta(), overlay, console)
    assert not overlay.exists()
    assert snap.disk.stat().st_ino == inode          # moved, not copied
    assert snap.console_log.read_text() == "boot log"
    again = store.get("job-1")
    assert again.meta == meta()
    assert [s.meta.id for s in store.list()] == ["job-1"]
    store.remove("job-1")
    assert store.list() == []


def test_unknown_and_malicious_ids_are_refused(tmp_path):
    store = SnapshotStore(tmp_path)
    with pytest.raises(SnapshotError, match="no snapshot"):
        store.get("nope")
    for bad in ("../etc", ".hidden", ""):
        with pytest.raises(SnapshotError):
            store.get(bad)


def test_a_failed_preserve_gives_the_overlay_back(tmp_path):
    overlay = tmp_path / "overlay.qcow2"
    overlay.write_bytes(b"qcow")
    store = SnapshotStore(tmp_path / "snaps")
    store.preserve(meta("dup"), overlay, None)
    overlay.write_bytes(b"second")
    (tmp_path / "snaps" / "dup" / "keep").write_text("x")    # target dir not empty: rename fails
    with pytest.raises(SnapshotError):
        store.preserve(meta("dup"), overlay, None)
    assert overlay.read_bytes() == b"second"

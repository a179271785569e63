import json
import os
import subprocess
from pathlib import Path
from typing import Optional

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


def _store_with(tmp_path, specs):
    """specs: (id, user, created, size) -> a store holding those snapshots."""
    from dataclasses import replace
    store = SnapshotStore(tmp_path / "snaps")
    for snap_id, user, created, size in specs:
        overlay = tmp_path / f"{snap_id}.qcow2"
        overlay.write_bytes(b"x" * size)
        store.preserve(replace(meta(snap_id), user=user, created=created), overlay, None)
    return store


def test_prune_goes_oldest_first_by_age_count_per_user_and_total_size(tmp_path):
    from vmloader.bootstrapper.snapshots import Retention
    day = 86400.0
    store = _store_with(tmp_path, [("a-old", "alice", 0.0, 10), ("a1", "alice", 20 * day, 10),
                                   ("a2", "alice", 21 * day, 10), ("a3", "alice", 22 * day, 10),
                                   ("b1", "bob", 21.5 * day, 10)])
    now = 23 * day
    by_age = store.prune(Retention(max_age_days=14), now=now, dry_run=True)
    assert [(s.meta.id, why) for s, why in by_age] == [("a-old", "older than 14 days")]
    by_count = store.prune(Retention(max_count=2), now=now, dry_run=True)
    assert [s.meta.id for s, _ in by_count] == ["a-old", "a1"]          # bob's one snapshot stays
    by_size = store.prune(Retention(max_bytes=3 * 10 + 3 * 400), now=now, dry_run=True)
    assert [s.meta.id for s, _ in by_size][:1] == ["a-old"]
    assert {s.meta.id for s in store.list()} == {"a-old", "a1", "a2", "a3", "b1"}    # dry run: nothing gone
    store.prune(Retention(max_count=2), now=now)
    assert {s.meta.id for s in store.list()} == {"a2", "a3", "b1"}


def test_a_booted_snapshot_is_never_pruned_or_removed(tmp_path):
    from vmloader.bootstrapper.snapshots import Retention
    store = _store_with(tmp_path, [("old", "alice", 0.0, 10), ("new", "alice", 5.0, 10)])
    with store.hold("old"):
        assert store.in_use(store.get("old"))
        assert store.prune(Retention(max_count=1), now=10.0) == []
        with pytest.raises(SnapshotError, match="booted right now"):
            store.remove("old")
    assert not store.in_use(store.get("old"))
    assert [s.meta.id for s, _ in store.prune(Retention(max_count=1), now=10.0)] == ["old"]


def _job_record(jobs: Path, job_id: str, ended: float, *, owner_pid: Optional[int] = None,
                finished: bool = True, size: int = 10) -> Path:
    """A job dir as the runner leaves it: owner.json from the start, metadata.json at the end."""
    path = jobs / job_id
    path.mkdir(parents=True)
    (path / "owner.json").write_text(json.dumps({"pid": owner_pid or _dead_pid(), "started": ended - 5}))
    (path / "console.log").write_bytes(b"x" * size)
    if finished:
        (path / "metadata.json").write_text(json.dumps({"job_id": job_id, "exit_status": 0}))
        os.utime(path / "metadata.json", (ended, ended))
    return path


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_job_records_are_pruned_with_the_snapshot_limits_oldest_first(tmp_path):
    from vmloader.bootstrapper.snapshots import Retention
    day = 86400.0
    store = SnapshotStore(tmp_path / "snapshots")
    for n, ended in enumerate((1 * day, 20 * day, 21 * day, 22 * day)):
        _job_record(tmp_path / "jobs", f"job-{n}", ended)
    now = 23 * day
    ids = lambda pairs: [path.name for path, _ in pairs]
    assert ids(store.prune_records(Retention(max_age_days=14), now=now, dry_run=True)) == ["job-0"]
    assert ids(store.prune_records(Retention(max_count=3), now=now, dry_run=True)) == ["job-0"]
    one = sum(f.stat().st_size for f in (tmp_path / "jobs" / "job-3").iterdir())
    by_size = store.prune_records(Retention(max_bytes=int(2.5 * one)), now=now, dry_run=True)
    assert ids(by_size) == ["job-0", "job-1"]
    assert len(list((tmp_path / "jobs").iterdir())) == 4            # dry run: nothing gone
    store.prune(Retention(max_count=2, max_age_days=14), now=now)      # what runs after every job
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["job-2", "job-3"]


def test_a_running_or_orphaned_jobs_record_is_never_pruned(tmp_path):
    from vmloader.bootstrapper.snapshots import Retention
    jobs = tmp_path / "jobs"
    _job_record(jobs, "running", 0.0, owner_pid=os.getpid(), finished=False)       # no metadata.json yet
    _job_record(jobs, "orphan", 0.0, finished=False)                               # for `vmloader cleanup`
    _job_record(jobs, "writing-tails", 0.0, owner_pid=os.getpid())               # ended, bootstrapper still up
    _job_record(jobs, "done", 0.0)
    (jobs / ".cleanup.lock").write_text("")
    store = SnapshotStore(tmp_path / "snapshots")
    pruned = store.prune_records(Retention(max_count=1, max_age_days=1, max_bytes=1), now=10 * 86400.0)
    assert [path.name for path, _ in pruned] == ["done"]
    assert sorted(p.name for p in jobs.iterdir()) == [".cleanup.lock", "orphan", "running", "writing-tails"]


def test_without_a_jobs_dir_pruning_records_does_nothing(tmp_path):
    from vmloader.bootstrapper.snapshots import Retention
    assert SnapshotStore(tmp_path / "snapshots").prune_records(Retention(max_count=1)) == []

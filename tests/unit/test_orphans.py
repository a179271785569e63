import json

from vmloader.bootstrapper.orphans import find_orphans, reap
from vmloader.bootstrapper.snapshots import SnapshotStore


def job(jobs, name, pid, finished=False, policy="on-failure"):
    path = jobs / name
    path.mkdir(parents=True)
    (path / "owner.json").write_text(json.dumps({"pid": pid, "snapshot": policy, "command": ["x"], "image": "i"}))
    (path / "overlay.qcow2").write_bytes(b"qcow")
    if finished:
        (path / "metadata.json").write_text("{}")
    return path


def test_only_unfinished_jobs_of_dead_owners_are_orphans(tmp_path):
    jobs = tmp_path / "jobs"
    job(jobs, "alive", 1)
    dead = job(jobs, "dead", 2)
    job(jobs, "done", 3, finished=True)
    assert find_orphans(jobs, alive=lambda pid: pid == 1) == [dead]


def test_reaping_keeps_the_overlay_unless_the_policy_is_never(tmp_path):
    jobs, store = tmp_path / "jobs", SnapshotStore(tmp_path / "snaps")
    kept = reap(job(jobs, "a", 2), None, store)
    assert kept.snapshot == "a" and (tmp_path / "snaps" / "a" / "disk.qcow2").exists()
    dropped = reap(job(jobs, "b", 2, policy="never"), None, store)
    assert dropped.snapshot is None and not (jobs / "b" / "overlay.qcow2").exists()
    assert json.loads((jobs / "b" / "metadata.json").read_text())["outcome"] == "orphaned"

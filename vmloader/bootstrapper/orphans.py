"""Jobs whose bootstrapper died (SIGKILL, OOM, node reboot of the daemon): find and end them.

Every job dir holds `owner.json` (the bootstrapper's pid and the snapshot
policy) until the job's `metadata.json` is written at its end. A job dir
with an owner that is no longer alive and no metadata is an orphan: its VM
is destroyed, its overlay kept as a snapshot (unless the policy is never:
the job did not finish, which counts as a failure) and its record written.
"""
import json
import fcntl
import os
import pwd
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import libvirt

from . import privatefiles
from .proc import pid_alive
from .errors import EXIT_INFRA
from .snapshots import SnapshotMeta, SnapshotStore, should_keep


@dataclass(frozen=True)
class Orphan:
    job_id: str
    owner_pid: int
    domain_destroyed: bool
    snapshot: Optional[str]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def find_orphans(jobs_dir: Path, alive: Callable[[int], bool] = pid_alive) -> List[Path]:
    if not jobs_dir.is_dir():
        return []
    found = []
    for job_dir in sorted(jobs_dir.iterdir()):
        owner = job_dir / "owner.json"
        if not owner.exists() or (job_dir / "metadata.json").exists():
            continue
        try:
            pid = int(json.loads(owner.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            continue
        if not alive(pid):
            found.append(job_dir)
    return found


def reap_all(jobs_dir: Path, connect: Callable[[], "libvirt.virConnect"], store: SnapshotStore) -> List[Orphan]:
    """Reap every orphan; one vmloader at a time does it (others skip rather than wait)."""
    if not find_orphans(jobs_dir):
        return []
    with open(privatefiles.open_private(jobs_dir / ".cleanup.lock", append=True), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []
        conn = connect()
        try:
            return [reap(job_dir, conn, store) for job_dir in find_orphans(jobs_dir)]
        finally:
            conn.close()


def reap(job_dir: Path, conn, store: SnapshotStore) -> Orphan:
    owner = json.loads((job_dir / "owner.json").read_text())
    destroyed = _destroy(conn, owner.get("domain") or f"vmloader-{job_dir.name}")
    overlay = job_dir / "overlay.qcow2"
    snapshot = None
    if overlay.exists() and should_keep(owner.get("snapshot", "on-failure"), failed=True):
        meta = SnapshotMeta(
            id=job_dir.name, created=time.time(), image=owner.get("image", ""), image_sha256="",
            base_path="", command=owner.get("command", []), exit_status=EXIT_INFRA, outcome="orphaned",
            user=_user(), hostname=socket.gethostname(),
            error=f"the bootstrapper (pid {owner['pid']}) died during the job")
        snapshot = store.preserve(meta, overlay, job_dir / "console.log").meta.id
    else:
        overlay.unlink(missing_ok=True)
    (job_dir / "agent.sock").unlink(missing_ok=True)
    privatefiles.write_private(job_dir / "metadata.json", json.dumps(
        {"job_id": job_dir.name, "command": owner.get("command"), "image": owner.get("image"),
         "exit_status": EXIT_INFRA, "outcome": "orphaned", "snapshot": snapshot,
         "error": {"message": f"the bootstrapper (pid {owner['pid']}) died; cleaned up later"}}, indent=2) + "\n")
    return Orphan(job_dir.name, int(owner["pid"]), destroyed, snapshot)


def _destroy(conn, name: str) -> bool:
    if conn is None:
        return False
    try:
        conn.lookupByName(name).destroy()
        return True
    except libvirt.libvirtError:
        return False      # already gone (QEMU died too, or the host rebooted)


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())

"""The snapshot store: a job's final disk state kept for post-mortem debugging.

A snapshot is a directory `<store>/<id>/` holding the job's overlay (moved
there, never copied: preserving is a rename), the console log, a UEFI job's
variable store (its NVRAM: boot entries the guest wrote) and `metadata.json` (image and its sha256, command, exit status, timings, user).
The overlay's backing file is the cached base image, which is never written.
"""
import builtins
import contextlib
import fcntl
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from . import privatefiles, proc
from .console import tail_bytes
from .errors import SnapshotError, VMLoaderError

POLICIES = ("always", "on-failure", "never")


def should_keep(policy: str, failed: bool) -> bool:
    return policy == "always" or (policy == "on-failure" and failed)


@dataclass(frozen=True)
class SnapshotMeta:
    id: str
    created: float
    image: str
    image_sha256: str
    base_path: str
    command: list
    exit_status: int
    outcome: str
    user: str
    hostname: str
    timings: dict = field(default_factory=dict)
    error: Optional[str] = None
    env: dict = field(default_factory=dict)      # the job's --env, for `snapshot exec`
    root: bool = False
    memory: bool = False                         # guest memory kept too (timed out): boot resumes it

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Snapshot:
    meta: SnapshotMeta
    path: Path

    @property
    def disk(self) -> Path:
        return self.path / "disk.qcow2"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def memory_state(self) -> Path:
        """The guest's memory and device state (libvirt save format), when meta.memory."""
        return self.path / "memory.save"

    @property
    def uefi_vars(self) -> Path:
        """A UEFI job's variable store as its job ended; a booted snapshot starts from a copy of it."""
        return self.path / "uefi-vars.fd"

    @property
    def booted_file(self) -> Path:
        """Written by `vmloader snapshot boot` while the snapshot runs: how to attach to it."""
        return self.path / "booted.json"

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def logs(self, lines: int = 50) -> dict:
        """What `vmloader snapshot logs` shows: console, output tails, phase timings. The text is the
        guest's bytes (undecodable ones as surrogate escapes): whoever shows it escapes it."""
        def text(name: str) -> str:
            path = self.path / name
            return path.read_bytes().decode("utf-8", "surrogateescape") if path.exists() else ""
        console = tail_bytes(self.console_log, lines).decode("utf-8", "surrogateescape")
        return {"console_log": str(self.console_log), "console_tail": console,
                "stdout_tail": text("stdout.tail"), "stderr_tail": text("stderr.tail"),
                "timings": self.meta.timings}

    def to_dict(self) -> dict:
        data = self.meta.to_dict()
        data.update(path=str(self.path), disk=str(self.disk), console_log=str(self.console_log),
                    size_bytes=self.size_bytes())
        return data


class SnapshotStore:
    def __init__(self, root: Path, access: Optional[privatefiles.Access] = None,
                 jobs_dir: Optional[Path] = None):
        self.root = Path(root)
        self._access = access
        # The job records beside the store (<state_dir>/jobs): pruned with the same limits.
        self.jobs_dir = Path(jobs_dir) if jobs_dir is not None else self.root.parent / "jobs"

    @property
    def access(self) -> privatefiles.Access:
        """Who besides the owner may search a snapshot: QEMU's group as root (to boot it again)."""
        if self._access is None:
            self._access = privatefiles.current()
        return self._access

    def _dir(self, snap_id: str) -> Path:
        if not snap_id or "/" in snap_id or snap_id.startswith("."):
            raise SnapshotError(f"invalid snapshot id {snap_id!r}", hint="see `vmloader snapshot list`")
        return self.root / snap_id

    def preserve(self, meta: SnapshotMeta, overlay: Path, console_log: Optional[Path],
                 memory_state: Optional[Path] = None, uefi_vars: Optional[Path] = None) -> Snapshot:
        """Move the overlay (a rename: constant time whatever the disk size) into the store,
        and the memory state and UEFI variable store with it when there are."""
        path = self._dir(meta.id)
        privatefiles.private_dir(self.root, self.access, "snapshot store", parents=True)
        tmp = self.root / f".{meta.id}.partial"
        # Private to the job's user; as root QEMU's group may search it, to boot the snapshot
        # again (libvirt then lends QEMU the 0600 disk for the run). Nobody else may list or read.
        tmp.mkdir(mode=0o700)
        try:
            privatefiles.private_dir(tmp, self.access, "snapshot directory")
            os.replace(overlay, tmp / "disk.qcow2")
            os.chmod(tmp / "disk.qcow2", 0o600)
            if memory_state is not None and memory_state.exists():
                os.replace(memory_state, tmp / "memory.save")
                os.chmod(tmp / "memory.save", 0o600)
            if uefi_vars is not None and uefi_vars.exists():
                os.replace(uefi_vars, tmp / "uefi-vars.fd")
                os.chmod(tmp / "uefi-vars.fd", 0o600)
            if console_log is not None and console_log.exists():
                shutil.copyfile(console_log, tmp / "console.log")
                os.chmod(tmp / "console.log", 0o600)
            privatefiles.write_private(tmp / "metadata.json", json.dumps(meta.to_dict(), indent=2) + "\n")
            os.replace(tmp, path)
        except (OSError, VMLoaderError) as exc:
            if (tmp / "disk.qcow2").exists() and not overlay.exists():
                os.replace(tmp / "disk.qcow2", overlay)   # give the overlay back, lose nothing
            if memory_state is not None and (tmp / "memory.save").exists():
                os.replace(tmp / "memory.save", memory_state)
            if uefi_vars is not None and (tmp / "uefi-vars.fd").exists():
                os.replace(tmp / "uefi-vars.fd", uefi_vars)
            shutil.rmtree(tmp, ignore_errors=True)
            raise SnapshotError(f"could not preserve snapshot {meta.id}: {exc}",
                                hint=f"the job's disk state is still at {overlay}", phase="snapshot") from None
        return Snapshot(meta, path)

    def get(self, snap_id: str) -> Snapshot:
        path = self._dir(snap_id)
        try:
            data = json.loads((path / "metadata.json").read_text())
        except FileNotFoundError:
            raise SnapshotError(f"no snapshot with id {snap_id!r} in {self.root}",
                                hint="see `vmloader snapshot list`") from None
        except PermissionError:
            raise _not_yours(path) from None
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"snapshot {snap_id} has unreadable metadata: {exc}",
                                hint=f"inspect {path} by hand") from None
        known = {f.name for f in fields(SnapshotMeta)}
        try:
            return Snapshot(SnapshotMeta(**{k: v for k, v in data.items() if k in known}), path)
        except TypeError as exc:
            raise SnapshotError(f"snapshot {snap_id} has incomplete metadata: {exc}",
                                hint=f"inspect {path} by hand") from None

    def list(self) -> "list[Snapshot]":
        found = []
        try:
            if not self.root.is_dir():
                return []
            paths = sorted(self.root.iterdir())
        except PermissionError:                # the store is private to its owner (0700)
            raise _not_yours(self.root) from None
        for path in paths:
            if path.is_dir() and not path.name.startswith("."):
                try:
                    found.append(self.get(path.name))
                except SnapshotError:
                    continue
        return sorted(found, key=lambda s: s.meta.created)

    def remove(self, snap_id: str) -> None:
        snapshot = self.get(snap_id)
        if self.in_use(snapshot):
            raise SnapshotError(f"snapshot {snap_id} is booted right now (vmloader snapshot exec)",
                                hint="remove it when that command has finished")
        shutil.rmtree(snapshot.path)

    @contextlib.contextmanager
    def hold(self, snap_id: str):
        """Mark a snapshot as booted for the duration: prune and rm leave it alone."""
        path = self._dir(snap_id) / ".in-use"
        with open(privatefiles.open_private(path, append=True), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH)
            yield

    def in_use(self, snapshot: Snapshot) -> bool:
        path = snapshot.path / ".in-use"
        if not path.exists():
            return False
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    def prune(self, policy: "Retention", *, now: Optional[float] = None,
              dry_run: bool = False) -> builtins.list[tuple[Snapshot, str]]:
        """Remove what the retention limits exceed, oldest first; never a booted snapshot.

        Limits: age, count per user, total bytes (0 = no limit). Returns (snapshot, reason) pairs.
        """
        now = time.time() if now is None else now
        every = self.list()
        alive = [s for s in every if not self.in_use(s)]
        doomed = {}
        for snap in alive:
            if policy.max_age_days and now - snap.meta.created > policy.max_age_days * 86400:
                doomed[snap.meta.id] = (snap, f"older than {policy.max_age_days:g} days")
        if policy.max_count:
            by_user: dict = {}
            for snap in alive:
                if snap.meta.id not in doomed:
                    by_user.setdefault(snap.meta.user, []).append(snap)
            for user, snaps in by_user.items():
                for snap in snaps[:max(0, len(snaps) - policy.max_count)]:
                    doomed[snap.meta.id] = (snap, f"more than {policy.max_count} snapshots of {user}")
        if policy.max_bytes:
            sizes = {s.meta.id: s.size_bytes() for s in every}
            total = sum(size for sid, size in sizes.items() if sid not in doomed)
            for snap in alive:
                if total <= policy.max_bytes:
                    break
                if snap.meta.id not in doomed:
                    doomed[snap.meta.id] = (snap, f"the store exceeds {policy.max_bytes} bytes")
                    total -= sizes[snap.meta.id]
        pruned = sorted(doomed.values(), key=lambda pair: pair[0].meta.created)
        if not dry_run:
            for snap, _ in pruned:
                shutil.rmtree(snap.path, ignore_errors=True)
        self.prune_records(policy, now=now, dry_run=dry_run)
        return pruned

    def prune_records(self, policy: "Retention", *, now: Optional[float] = None,
                      dry_run: bool = False) -> builtins.list[tuple[Path, str]]:
        """Job records (<state_dir>/jobs/<id>) beyond the same limits, oldest first: a busy worker
        runs thousands of jobs a day. A record counts from its metadata.json, written when its job
        ended; a job without one is running or awaits `vmloader cleanup`, and is never pruned, nor
        one whose bootstrapper still runs. Returns (path, reason) pairs."""
        now = time.time() if now is None else now
        records = _finished_records(self.jobs_dir)
        doomed = {}
        for path, ended in records:
            if policy.max_age_days and now - ended > policy.max_age_days * 86400:
                doomed[path] = f"older than {policy.max_age_days:g} days"
        if policy.max_count:
            for path, _ in records[:max(0, len(records) - policy.max_count)]:
                doomed.setdefault(path, f"more than {policy.max_count} job records")
        if policy.max_bytes:
            sizes = {path: _tree_bytes(path) for path, _ in records}
            total = sum(size for path, size in sizes.items() if path not in doomed)
            for path, _ in records:
                if total <= policy.max_bytes:
                    break
                if path not in doomed:
                    doomed[path] = f"the job records exceed {policy.max_bytes} bytes"
                    total -= sizes[path]
        pruned = [(path, doomed[path]) for path, _ in records if path in doomed]
        if not dry_run:
            for path, _ in pruned:
                shutil.rmtree(path, ignore_errors=True)
        return pruned


def _finished_records(jobs_dir: Path) -> list[tuple[Path, float]]:
    """(job dir, when it ended) for every finished job whose bootstrapper is gone, oldest first."""
    found: list[tuple[Path, float]] = []
    try:
        paths = list(jobs_dir.iterdir())
    except OSError:
        return found
    for path in paths:
        try:
            if path.name.startswith(".") or not path.is_dir() or _owner_alive(path):
                continue
            found.append((path, (path / "metadata.json").stat().st_mtime))
        except OSError:
            continue                 # no metadata.json: running, or an orphan for `vmloader cleanup`
    return sorted(found, key=lambda pair: pair[1])


def _owner_alive(job_dir: Path) -> bool:
    try:
        pid = int(json.loads((job_dir / "owner.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return proc.pid_alive(pid)


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _not_yours(path: Path) -> SnapshotError:
    return SnapshotError(f"permission denied: {path} belongs to another user",
                         hint="a job's snapshots are readable only by the user the job ran as "
                              "(and root); ask them, or run as them")


@dataclass(frozen=True)
class Retention:
    max_count: int = 0          # per user; 0 = no limit
    max_bytes: int = 0          # whole store; 0 = no limit
    max_age_days: float = 0     # 0 = no limit



def check_chain(kept: Snapshot, base: Path, phase: str) -> None:
    """A snapshot is a qcow2 layer over its image's base: both must still be there, unchanged."""
    if not kept.disk.is_file():
        raise SnapshotError(f"snapshot {kept.meta.id} has no disk ({kept.disk} is missing)",
                            hint=f"the snapshot is incomplete; remove it with `vmloader snapshot rm {kept.meta.id}`",
                            phase=phase)
    if Path(kept.meta.base_path) != base:
        raise SnapshotError(
            f"snapshot {kept.meta.id} was taken over {kept.meta.base_path}, but its image {kept.meta.image} "
            f"is now at {base}", hint="the image cache moved (cache_dir changed): point cache_dir back at the "
                                      "cache the job used", phase=phase)
    info = json.loads(proc.run(["qemu-img", "info", "--output=json", str(kept.disk)], phase=phase,
                               hint=f"the snapshot disk {kept.disk} may be corrupt").stdout)
    if info.get("format") != "qcow2" or info.get("backing-filename") != kept.meta.base_path:
        raise SnapshotError(f"snapshot {kept.meta.id}'s disk is not a qcow2 layer over {kept.meta.base_path}",
                            hint=f"it is damaged; inspect {kept.disk} with qemu-img info", phase=phase)


def export(snapshot: Snapshot, base_present: bool, dest: Path) -> Path:
    """Flatten the snapshot and its base into one standalone qcow2 (no backing file).

    Written next to `dest` and renamed at the end: a failure (no space) leaves no
    half-written image, and the snapshot itself is only read.
    """
    if not base_present:
        raise SnapshotError(f"the base image of snapshot {snapshot.meta.id} ({snapshot.meta.image}, "
                            f"sha256 {snapshot.meta.image_sha256[:16]}...) is not in the cache and no "
                            "repository offers it", hint=f"pull {snapshot.meta.image} again (vmloader images "
                            "pull) or restore the file; the snapshot alone holds only what the job changed")
    dest = Path(dest)
    if dest.exists():
        raise SnapshotError(f"{dest} exists", hint="choose a new file name or remove it first")
    check_chain(snapshot, Path(snapshot.meta.base_path), phase="export")
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        proc.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(snapshot.disk), str(tmp)], phase="export",
                 hint=f"is there room for the whole disk in {dest.parent}? (df -h {dest.parent})")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest

"""Warm states: a clean image booted once to agent-ready, quiesced and saved with its memory,
so a job restores it instead of booting (see "Warm start" in docs/reliability.md).

Layout, in the cache of the user who builds them (root: `<cache_dir>/warm`, the shared cache;
anyone else: their private cache):

    warm/<key[:32]>/lane-<n>/lock          flock: held by the job restoring (or building) this lane
                             share.lock    (shared cache only) flock: users restoring it, shared
                             disk.qcow2    the disk as it was when saved (read-only middle layer)
                             memory.save   the saved VM (libvirt save image)
                             meta.json     written last: the lane is complete; stamps + sha256

libvirt restores a saved domain only under the name and uuid it was saved with, so two
restores of one state collide: there is one saved state per concurrent lane, built on demand
by the first job that finds every lane busy (up to `warm_lanes`; above that, jobs boot cold).

Shared states (HTCondor runs VM jobs as their users, under qemu:///session). Root (a job of
root's, or `vmloader images warm NAME` from a STARTD_CRON) builds states in the shared cache,
world-readable like the images there: a clean image booted to agent-ready holds nothing of
anyone's (each job gets its entropy, hostname, machine-id, clock and files after restore).
An unprivileged user's job *borrows* such a lane read-only (`SharedWarm`): it restores
memory.save through its own session daemon with a replacement XML (libvirt's restore with
dxml, which keeps the guest ABI and lets host-side parts change): its own overlay on top of
the lane's disk.qcow2, its own sockets and console log, no system-only parts (seclabels,
the cgroup partition). A user never writes into root's states, and never restores a state
another user wrote: what a user builds stays in their own cache.

Locks between root and users: root's jobs hold `lock` exclusively (the name collides inside
the system daemon). A user's restore holds `share.lock` shared only while libvirt reads the
state (QEMU then holds its files open), and the lane's name in its own daemon by a lock in
that daemon's runtime dir (`$XDG_RUNTIME_DIR`): a user's CLI jobs share one session daemon
and take turns per lane; HTCondor gives each job a daemon of its own, so they never wait.
Root never rewrites a lane's files in place: dropping one (eviction, a rebuild) waits up to
USER_GRACE seconds for users' shared locks, then unlinks the files anyway. A user holding
`share.lock` forever therefore delays root by USER_GRACE, never blocks it, and a restore
running late reads either the whole old files (still open) or nothing (and boots its own way).
"""
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from . import privatefiles
from .cache import owns, sha256_file
from .errors import VMLoaderError

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
AGENT_SILENCE = 20.0         # seconds a restored guest's agent has to answer before its state is dropped
QUIESCE = "sync; echo 3 > /proc/sys/vm/drop_caches; sync"
STAMPED = ("memory.save", "disk.qcow2")
NO_ROOM = "no-room.json"     # in a state's directory: a build ran out of space with this much free
SHARE_LOCK = "share.lock"
USER_GRACE = 30.0            # seconds root waits for users' restores before dropping a shared lane
SHARED_DIR_MODE = 0o755
SHARED_FILE_MODE = 0o644
NAMING = 2                   # how a lane's VM is named (2: with its store's tag); part of the key, as
                             # libvirt restores a state only under the name it was saved with


class WarmUnusable(VMLoaderError):
    """A warm state that must not (or could not) be used: the job boots cold instead."""


def warm_root(cfg) -> Path:
    """Where this user's warm states live: the cache they own (root: the shared one), else their own."""
    return (cfg.cache_dir if owns(cfg.cache_dir) else cfg.own_cache_dir) / "warm"


def own_store(cfg, max_lanes: int) -> "WarmStore":
    """The states this user builds and restores as their own (root's are the shared ones)."""
    shared = os.geteuid() == 0 and owns(cfg.cache_dir)
    return WarmStore(warm_root(cfg), max_lanes, shared=shared)


def shared_root(cfg) -> Optional[Path]:
    """Root's states an unprivileged user may restore read-only: the shared cache's (None for
    the cache owner, whose own states those are)."""
    return None if owns(cfg.cache_dir) else cfg.cache_dir / "warm"


def daemon_lock_dir(cfg) -> Path:
    """Where a user's job locks a borrowed lane's name: beside its libvirt session daemon (one per
    $XDG_RUNTIME_DIR; HTCondor gives each job its own), else in the user's own cache."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "vmloader-warm" if runtime else cfg.own_cache_dir / "warm-borrowed"


def shared_warm_images(cfg, entries: dict, network: str = "user") -> list:
    """The image names (of `entries`, {name: entry}) with a complete, intact warm state in the shared
    cache for their default shape (the image's cpus and memory, user network), built by this agent
    and QEMU: what a worker advertises as VMLoaderWarmImages. Reads only (any user may ask)."""
    return sorted(name for name, lanes in shared_warm_lanes(cfg, entries, network).items() if lanes)


def shared_warm_lanes(cfg, entries: dict, network: str = "user") -> Dict[str, int]:
    """{name: how many complete, intact lanes of its default shape the shared cache holds} for
    `entries` (see shared_warm_images; the cache service's keeper builds the missing ones)."""
    found = {name: 0 for name in entries}
    for state in WarmStore(cfg.cache_dir / "warm", 0).states():
        meta, number = state["meta"], state["lane"].number
        parts = meta.get("parts") or {}
        if (parts.get("agent"), parts.get("qemu"), parts.get("network")) != (agent_version(), qemu_version(), network):
            continue
        lane = Lane(state["lane"].dir, str(meta.get("key")), number, borrowed=True)
        if meta.get("domain") != lane.domain_name or not lane.matches_meta():
            continue
        for name, entry in entries.items():
            disk = entry.artifacts.get("disk")
            if (disk is not None and parts.get("image_sha256") == disk.sha256
                    and parts.get("cpus") == (entry.cpus or cfg.cpus)
                    and parts.get("memory_mib") == (entry.memory_mib or cfg.memory_mib)):
                found[name] += 1
    return found


def default_lanes() -> int:
    return 2 * (os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def qemu_version(binary: str = "qemu-system-x86_64") -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


@functools.lru_cache(maxsize=None)
def agent_version() -> str:
    """A hash of the agent's code as installed in images (a state saved with another agent is stale)."""
    digest = hashlib.sha256()
    for path in sorted((PACKAGE_ROOT / "agent").glob("*.py")) + [PACKAGE_ROOT / "protocol.py"]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def store_tag(root: Path) -> str:
    """A short name for the warm store at `root`, unique per store on a host: of its real path, so
    root and a user naming one cache by different paths (a symlink) agree on its lanes' names."""
    return hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:8]


def state_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _stamp(path: Path) -> list:
    st = os.stat(path, follow_symlinks=False)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


@dataclass(frozen=True)
class Lane:
    dir: Path
    key: str
    number: int
    shared: bool = False        # in the shared cache: readable by every user (root builds it)
    borrowed: bool = False      # another's (root's) lane this job restores read-only: never written

    @property
    def domain_name(self) -> str:
        """The name its VM is saved (and restored) under: the key names the state, the store's
        tag keeps two caches' lanes of one key apart inside one libvirt daemon (root's shared
        cache and a test's or a second instance's cache warming the same image and shape)."""
        return f"vmloader-warm-{self.key[:12]}-{store_tag(self.dir.parent.parent)}-{self.number}"

    @property
    def memory(self) -> Path:
        return self.dir / "memory.save"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def meta_path(self) -> Path:
        return self.dir / "meta.json"

    def meta(self) -> Optional[dict]:
        try:
            with open(os.open(self.meta_path, os.O_RDONLY | os.O_NOFOLLOW)) as handle:
                data = json.load(handle)
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def complete(self) -> bool:
        return self.meta() is not None

    def check(self) -> None:
        """WarmUnusable unless the files are exactly those saved (stamps, else their sha256)."""
        meta = self.meta()
        if meta is None:
            raise WarmUnusable("its completion record is missing or unreadable")
        for name in STAMPED:
            recorded = (meta.get("files") or {}).get(name) or {}
            try:
                if _stamp(self.dir / name) == recorded.get("stamp"):
                    continue
                if sha256_file(self.dir / name) != recorded.get("sha256"):
                    raise WarmUnusable(f"{name} differs from what was saved")
            except FileNotFoundError:
                raise WarmUnusable(f"{name} is missing") from None
        meta["files"] = {name: dict(meta["files"][name], stamp=_stamp(self.dir / name)) for name in STAMPED}
        self._write_meta(meta)        # same bytes, new stamp (e.g. copied): no re-hash next time

    def commit(self, parts: dict, image: str) -> None:
        """The build is done (its files reclaimed: `reclaim`): record what was saved; from now on
        the lane is complete."""
        files = {name: {"stamp": _stamp(self.dir / name), "sha256": sha256_file(self.dir / name)}
                 for name in STAMPED}
        self._write_meta({"key": self.key, "parts": parts, "image": image, "domain": self.domain_name,
                          "built": time.time(), "files": files})

    def touch(self) -> None:
        meta = self.meta()
        if meta is not None:
            meta["last_used"] = time.time()
            self._write_meta(meta)

    def _write_meta(self, meta: dict) -> None:
        if self.borrowed:
            return
        tmp = self.dir / "meta.json.tmp"
        privatefiles.write_private(tmp, json.dumps(meta, indent=2) + "\n")
        if self.shared:
            os.chmod(tmp, SHARED_FILE_MODE, follow_symlinks=False)
        os.rename(tmp, self.meta_path)

    def reclaim(self) -> None:
        """The lane's files ours again after libvirt lent them to QEMU (shared: readable by all)."""
        if self.borrowed:
            return
        for name in STAMPED:
            privatefiles.reclaim(self.dir / name)
            if self.shared and (self.dir / name).exists():
                os.chmod(self.dir / name, SHARED_FILE_MODE, follow_symlinks=False)

    def matches_meta(self) -> bool:
        """The files are the very ones recorded (read-only check: stamps alone)."""
        meta = self.meta()
        if meta is None or meta.get("key") != self.key:
            return False
        try:
            return all(_stamp(self.dir / name) == ((meta.get("files") or {}).get(name) or {}).get("stamp")
                       for name in STAMPED)
        except OSError:
            return False

    def drop(self, grace: float = USER_GRACE) -> None:
        """Remove the state (the lock files stay: other jobs may be waiting on them). A shared lane
        first waits up to `grace` seconds for the users restoring it. A lane whose directory is
        already gone (removed by hand while a job held it) is dropped already."""
        if self.borrowed or not self.dir.is_dir():
            return
        if self.shared:
            _wait_for_users(self.dir / SHARE_LOCK, grace)
        try:
            paths = list(self.dir.iterdir())
        except FileNotFoundError:
            return
        for path in paths:
            if path.name not in ("lock", SHARE_LOCK):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def size_bytes(self) -> int:
        return sum(p.lstat().st_size for p in self.dir.iterdir())


class HeldLane:
    """A lane whose lock this process holds (closing releases it)."""

    def __init__(self, lane: Lane, fd: int):
        self.lane = lane
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "HeldLane":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shared_dir(path: Path, parents: bool) -> None:
    """A directory of root's states: ours, readable and searchable by all, writable by us alone."""
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, SHARED_DIR_MODE)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise VMLoaderError(f"the warm state directory {path} is not a directory of the cache owner's "
                            f"(owner uid {info.st_uid}, {stat.filemode(info.st_mode)})",
                            hint=f"remove {path}: warm states are rebuilt on demand", phase="setup")
    if stat.S_IMODE(info.st_mode) != SHARED_DIR_MODE:
        os.chmod(path, SHARED_DIR_MODE)


def _wait_for_users(share_lock: Path, grace: float) -> None:
    """Wait until no user restores from the lane (their shared locks), at most `grace` seconds."""
    try:
        fd = os.open(share_lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        deadline = time.monotonic() + grace
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() >= deadline:
                    return
            time.sleep(0.1)
    finally:
        os.close(fd)


class BorrowedLane(HeldLane):
    """Root's lane a user's job restores: its name locked in the user's daemon (`fd`), and
    users' shared lock on it (`share_fd`) until the restore has read it."""

    def __init__(self, lane: Lane, fd: int, share_fd: int):
        super().__init__(lane, fd)
        self.share_fd = share_fd

    def restored(self) -> None:
        """QEMU holds the files now: root may drop the lane."""
        if self.share_fd >= 0:
            os.close(self.share_fd)
            self.share_fd = -1

    def close(self) -> None:
        self.restored()
        super().close()


class SharedWarm:
    """Root's warm states in the shared cache, as an unprivileged user's jobs see them: read-only."""

    def __init__(self, root: Path, lock_dir: Path, refused_dir: Optional[Path] = None):
        self.root = Path(root)
        self.lock_dir = Path(lock_dir)
        self.refused_dir = refused_dir

    @staticmethod
    def _note(refused_dir: Path, lane: Lane) -> Path:
        return refused_dir / f"{lane.key[:32]}-lane-{lane.number}.json"

    @staticmethod
    def refuse(refused_dir: Path, lane: Lane) -> None:
        """This lane failed this user: do not borrow it again until root rebuilds it (new files)."""
        privatefiles.private_dir(refused_dir, privatefiles.Access(), "warm state directory", parents=True)
        privatefiles.write_private(SharedWarm._note(refused_dir, lane), json.dumps(_stamp(lane.memory)) + "\n")

    def _refused(self, lane: Lane) -> bool:
        if self.refused_dir is None:
            return False
        try:
            with open(os.open(self._note(self.refused_dir, lane), os.O_RDONLY | os.O_NOFOLLOW)) as handle:
                return json.load(handle) == _stamp(lane.memory)
        except (OSError, ValueError):
            return False

    def _trusted(self, path: Path, owner: int) -> bool:
        """Owned by the cache's owner, not a symlink, writable by nobody else."""
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return st.st_uid == owner and not (st.st_mode & 0o022) and not stat.S_ISLNK(st.st_mode)

    def borrow(self, key: str) -> Optional[BorrowedLane]:
        """A complete lane of root's for `key` that this user's daemon does not run now, with the
        users' shared lock taken; None when there is none (the job goes its own way)."""
        try:
            owner = os.lstat(self.root.parent).st_uid
        except OSError:
            return None
        key_dir = self.root / key[:32]
        if not all(self._trusted(p, owner) for p in (self.root, key_dir)):
            return None
        for path in sorted(key_dir.glob("lane-*")):
            number = path.name[5:]
            if not number.isdigit():
                continue
            lane = Lane(path, key, int(number), shared=True, borrowed=True)
            if not all(self._trusted(p, owner) for p in (path, lane.meta_path, lane.memory, lane.disk)):
                continue
            if not lane.matches_meta() or self._refused(lane):
                continue
            held = self._lock_name(lane)
            if held is None:
                continue
            share_fd = self._share(lane, owner)
            if share_fd < 0:
                held.close()
                continue
            if not lane.matches_meta():      # (re-checked under the lock: root may have rebuilt it)
                os.close(share_fd)
                held.close()
                continue
            return BorrowedLane(lane, held.fd, share_fd)
        return None

    def _lock_name(self, lane: Lane) -> Optional[HeldLane]:
        privatefiles.private_dir(self.lock_dir, privatefiles.Access(), "warm lock directory", parents=True)
        fd = os.open(self.lock_dir / f"{lane.key[:32]}-lane-{lane.number}.lock",
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return HeldLane(lane, fd)

    def _share(self, lane: Lane, owner: int) -> int:
        try:
            fd = os.open(lane.dir / SHARE_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return -1
        try:
            if os.fstat(fd).st_uid != owner:
                raise OSError(errno.EPERM, "not the cache owner's")
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)      # root drops it right now: skip
        except OSError:
            os.close(fd)
            return -1
        return fd


class WarmStore:
    """The warm states of one user (one directory); `shared`: root's, in the shared cache."""

    def __init__(self, root: Path, max_lanes: int, access: Optional[privatefiles.Access] = None,
                 shared: bool = False):
        self.root = Path(root)
        self.max_lanes = max_lanes
        self._access = access
        self.shared = shared

    @property
    def access(self) -> privatefiles.Access:
        if self._access is None:
            self._access = privatefiles.current()
        return self._access

    def _key_dir(self, key: str) -> Path:
        return self.root / key[:32]

    def lanes(self, key: str) -> List[Lane]:
        found = []
        for path in sorted(self._key_dir(key).glob("lane-*")):
            number = path.name[5:]
            if number.isdigit():
                found.append(Lane(path, key, int(number), shared=self.shared))
        return sorted(found, key=lambda lane: lane.number)

    def _try_lock(self, lane: Lane) -> Optional[HeldLane]:
        for path in (self.root, self._key_dir(lane.key), lane.dir):
            if self.shared:
                _shared_dir(path, parents=path == self.root)
            else:
                privatefiles.private_dir(path, self.access, "warm state directory", parents=path == self.root)
        if self.shared:
            share = os.open(lane.dir / SHARE_LOCK, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                            SHARED_FILE_MODE)
            os.fchmod(share, SHARED_FILE_MODE)
            os.close(share)
        fd = os.open(lane.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        try:        # the lane was removed (evicted) between open and lock: not ours to use
            same = os.fstat(fd).st_ino == os.stat(lane.dir / "lock", follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        return HeldLane(lane, fd)

    def acquire(self, key: str) -> Optional[HeldLane]:
        """A lane for one job: a free complete one, else a free lane to build in (the caller builds
        it: `held.lane.complete()` is False); None when all `max_lanes` are busy."""
        existing = self.lanes(key)
        for lane in existing:
            if lane.complete():
                held = self._try_lock(lane)
                if held is not None:
                    if lane.complete():           # (re-checked under the lock)
                        return held
                    held.close()
        for number in range(self.max_lanes):
            lane = Lane(self._key_dir(key) / f"lane-{number}", key, number, shared=self.shared)
            held = self._try_lock(lane)
            if held is not None:
                if not lane.complete():
                    lane.drop()                    # whatever a build that died left
                return held
        return None

    def free_bytes(self, key: str) -> int:
        return shutil.disk_usage(self._key_dir(key)).free

    def no_room(self, key: str) -> Optional[str]:
        """Why building this state is not worth a try now: an earlier build ran out of space with at
        least as much free as there is now (None: try; the note goes once there is more room)."""
        path = self._key_dir(key) / NO_ROOM
        try:
            with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW)) as handle:
                noted = json.load(handle)
            before = noted["free"] if isinstance(noted, dict) else None
            free = self.free_bytes(key)
        except (OSError, ValueError, KeyError):
            return None
        if not isinstance(before, int) or free > before:
            path.unlink(missing_ok=True)
            return None
        return (f"saving one ran out of space with {before // 2 ** 20} MiB free, "
                f"{free // 2 ** 20} MiB free now")

    def note_no_room(self, key: str, free_before: int) -> None:
        """A build ran out of space: later jobs boot cold without trying until more is free."""
        privatefiles.write_private(self._key_dir(key) / NO_ROOM,
                                   json.dumps({"free": free_before, "time": time.time()}) + "\n")

    def states(self) -> Iterator[dict]:
        """Every complete lane: for `images list` and eviction."""
        if not self.root.is_dir():
            return
        for key_dir in sorted(self.root.iterdir()):
            if not key_dir.is_dir() or key_dir.is_symlink():
                continue
            for path in sorted(key_dir.glob("lane-*")):
                lane = Lane(path, key_dir.name, int(path.name[5:]) if path.name[5:].isdigit() else -1,
                            shared=self.shared)
                meta = lane.meta()
                if meta is not None:
                    yield {"lane": lane, "meta": meta, "bytes": lane.size_bytes()}

    def total_bytes(self) -> int:
        return sum(s["bytes"] for s in self.states())

    def summary(self) -> list:
        """Per image and shape: how many lanes and their size."""
        groups: dict = {}
        for state in self.states():
            meta = state["meta"]
            parts = meta.get("parts") or {}
            row = groups.setdefault(meta.get("key"), {
                "image": meta.get("image"), "key": meta.get("key"), "cpus": parts.get("cpus"),
                "memory_mib": parts.get("memory_mib"), "network": parts.get("network"),
                "lanes": 0, "bytes": 0, "last_used": 0.0})
            row["lanes"] += 1
            row["bytes"] += state["bytes"]
            row["last_used"] = max(row["last_used"], meta.get("last_used") or meta.get("built") or 0.0)
        return sorted(groups.values(), key=lambda r: (str(r["image"]), r["key"] or ""))

    def remove_image_states(self, artifact_sha256: str) -> int:
        """Drop every free lane built on an image with this artifact (evicted with it); bytes freed."""
        freed = 0
        for state in list(self.states()):
            if artifact_sha256 not in ((state["meta"].get("parts") or {}).get("image") or {}).values():
                continue
            held = self._try_lock(state["lane"])
            if held is None:
                continue                               # a job restores it right now
            with held:
                freed += state["bytes"]
                state["lane"].drop()
        return freed

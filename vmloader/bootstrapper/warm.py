"""Warm states: a clean image booted once to agent-ready, quiesced and saved with its memory,
so a job restores it instead of booting (see "Warm start" in docs/reliability.md).

Layout, in the cache of the user whose jobs use them (root: `<cache_dir>/warm`; anyone
else: their private cache, so nobody restores memory another user wrote):

    warm/<key[:32]>/lane-<n>/lock          flock: held by the job restoring (or building) this lane
                             disk.qcow2    the disk as it was when saved (read-only middle layer)
                             memory.save   the saved VM (libvirt save image)
                             meta.json     written last: the lane is complete; stamps + sha256

libvirt restores a saved domain only under the name and uuid it was saved with, so two
restores of one state collide: there is one saved state per concurrent lane, built on demand
by the first job that finds every lane busy (up to `warm_lanes`; above that, jobs boot cold).
"""
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

from . import privatefiles
from .cache import owns, sha256_file
from .errors import VMLoaderError

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
AGENT_SILENCE = 20.0         # seconds a restored guest's agent has to answer before its state is dropped
QUIESCE = "sync; echo 3 > /proc/sys/vm/drop_caches; sync"
STAMPED = ("memory.save", "disk.qcow2")
NO_ROOM = "no-room.json"     # in a state's directory: a build ran out of space with this much free


class WarmUnusable(VMLoaderError):
    """A warm state that must not (or could not) be used: the job boots cold instead."""


def warm_root(cfg) -> Path:
    """Where this user's warm states live: the cache they own (root: the shared one), else their own."""
    return (cfg.cache_dir if owns(cfg.cache_dir) else cfg.own_cache_dir) / "warm"


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

    @property
    def domain_name(self) -> str:
        return f"vmloader-warm-{self.key[:12]}-{self.number}"

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
        """The build is done: record what was saved; from now on the lane is complete."""
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
        tmp = self.dir / "meta.json.tmp"
        privatefiles.write_private(tmp, json.dumps(meta, indent=2) + "\n")
        os.rename(tmp, self.meta_path)

    def drop(self) -> None:
        """Remove the state (the lock file stays: other jobs may be waiting on it). A lane whose
        directory is already gone (removed by hand while a job held it) is dropped already."""
        try:
            paths = list(self.dir.iterdir())
        except FileNotFoundError:
            return
        for path in paths:
            if path.name != "lock":
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


class WarmStore:
    """The warm states of one user (one directory)."""

    def __init__(self, root: Path, max_lanes: int, access: Optional[privatefiles.Access] = None):
        self.root = Path(root)
        self.max_lanes = max_lanes
        self._access = access

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
                found.append(Lane(path, key, int(number)))
        return sorted(found, key=lambda lane: lane.number)

    def _try_lock(self, lane: Lane) -> Optional[HeldLane]:
        privatefiles.private_dir(self.root, self.access, "warm state directory", parents=True)
        privatefiles.private_dir(self._key_dir(lane.key), self.access, "warm state directory")
        privatefiles.private_dir(lane.dir, self.access, "warm state directory")
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
            lane = Lane(self._key_dir(key) / f"lane-{number}", key, number)
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
                lane = Lane(path, key_dir.name, int(path.name[5:]) if path.name[5:].isdigit() else -1)
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

"""Bookkeeping for the bounded image cache: an LRU index and cross-process pins.

The index (diskcache, in `<cache>/index`) records each artifact's size, the
image it belongs to and when a job last used it. It is only bookkeeping: the
artifact files are the truth, so a corrupted index is rebuilt from them.

A pin is a shared flock on `<cache>/pins/<sha256>.lock`, held by every job
using that artifact. Eviction takes the exclusive lock without waiting and
skips what it cannot get, so an image in use is never evicted, and a job
that dies drops its pin with its file descriptors.
"""
import fcntl
import os
import shutil
import sqlite3
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List

import diskcache


@dataclass(frozen=True)
class IndexEntry:
    sha256: str
    size: int
    image: str
    last_used: float


class CacheIndex:
    def __init__(self, root: Path, artifacts_dir: Path, shared: bool = False):
        self.path = Path(root)
        self.artifacts_dir = artifacts_dir
        self.shared = shared
        self._db = None

    def _prepare(self) -> None:
        """In a group-shared cache, create the database group-writable ourselves:
        SQLite creates it 0644 whatever the umask, and its WAL files copy that mode."""
        if not self.shared:
            return
        self.path.mkdir(mode=0o2775, exist_ok=True)
        try:
            fd = os.open(self.path / "cache.db", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o664)
        except FileExistsError:
            return                      # another process (maybe another user) made it: leave it
        os.fchmod(fd, 0o664)
        os.close(fd)

    def _open(self) -> diskcache.Cache:
        if self._db is None:
            self._prepare()
            try:
                self._db = diskcache.Cache(str(self.path))
                len(self._db)                       # touches the database: fails if corrupt
            except sqlite3.DatabaseError as exc:
                if "readonly" in str(exc) or "locked" in str(exc):
                    raise                           # not corrupt: just not ours to write, or busy
                self.rebuild()
        return self._db

    def rebuild(self) -> None:
        """Throw the index away and recreate it from the artifact files."""
        if self._db is not None:
            self._db.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self._prepare()
        self._db = diskcache.Cache(str(self.path))
        if self.artifacts_dir.is_dir():
            for path in self.artifacts_dir.iterdir():
                st = path.stat()
                self._db[path.name] = {"size": st.st_size, "image": "", "last_used": st.st_atime}

    def touch(self, sha256: str, size: int, image: str) -> None:
        self._open()[sha256] = {"size": size, "image": image, "last_used": time.time()}

    def forget(self, sha256: str) -> None:
        self._open().pop(sha256, None)

    def entries(self) -> List[IndexEntry]:
        db = self._open()
        found = []
        for key in list(db.iterkeys()):
            record = db.get(key)
            if record is not None:
                found.append(IndexEntry(key, record["size"], record["image"], record["last_used"]))
        return sorted(found, key=lambda e: e.last_used)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _lock_path(pins_dir: Path, sha256: str) -> Path:
    return pins_dir / f"{sha256}.lock"


def open_lock(path: Path):
    """A lock file any cache user can flock: read-only opens suffice for flock,
    and 0664 lets the group of a shared cache create and reuse it."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o664)
    return os.fdopen(fd, "rb")


@contextmanager
def pinned(pins_dir: Path, shas: Iterable[str]) -> Iterator[None]:
    """Hold shared pins on these artifacts for the duration of the block."""
    pins_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        for sha in shas:
            handle = stack.enter_context(open_lock(_lock_path(pins_dir, sha)))
            fcntl.flock(handle, fcntl.LOCK_SH)
        yield


@contextmanager
def exclusive_if_unpinned(pins_dir: Path, sha256: str) -> Iterator[bool]:
    """Yields True (holding the exclusive lock) when no job pins the artifact."""
    pins_dir.mkdir(parents=True, exist_ok=True)
    with open_lock(_lock_path(pins_dir, sha256)) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_artifact(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

"""Bookkeeping for the bounded image cache: an LRU index and cross-process pins.

The index (`<cache>/index/entries.sqlite3`) records each artifact's size, the
image it belongs to and when a job last used it, in plain columns: nothing in
it is ever unpickled or executed. Only the cache's writer opens it. It is only
bookkeeping: the artifact files are the truth, so a corrupted index, or one in
the old format (diskcache, whose values were pickles), is thrown away unread
and rebuilt from them.

A pin is a shared flock on `<cache>/pins/<sha256>.lock`, a 0444 file the writer
creates, held by every job using that artifact (readers open it read-only).
Eviction takes the exclusive lock without waiting and skips what it cannot
get, so an image in use is never evicted, and a job that dies drops its pin
with its file descriptors.
"""
import fcntl
import os
import re
import shutil
import sqlite3
import stat
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional

from .errors import ImageError
from .ownedfiles import NOFOLLOW, check_trusted, open_owned

SHA256 = re.compile(r"[0-9a-f]{64}")
DB_NAME = "entries.sqlite3"
PIN_WAIT = 60.0                 # seconds a reader waits for an eviction's exclusive lock to go


def check_sha256(key: str) -> str:
    if not isinstance(key, str) or not SHA256.fullmatch(key):
        raise ImageError(f"{key!r} is not a sha256 (64 lowercase hex digits)", phase="cache lookup")
    return key


@dataclass(frozen=True)
class IndexEntry:
    sha256: str
    size: int
    image: str
    last_used: float


class CacheIndex:
    def __init__(self, root: Path, artifacts_dir: Path):
        self.path = Path(root)
        self.artifacts_dir = artifacts_dir
        self._db: Optional[sqlite3.Connection] = None

    def _usable_dir(self) -> bool:
        """Our own directory holding only our own database (an old diskcache index is not)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return False
        names = set(os.listdir(self.path)) - {DB_NAME, DB_NAME + "-journal", DB_NAME + "-wal", DB_NAME + "-shm"}
        if names:
            return False                    # e.g. cache.db of the pickle-based index: never opened
        try:
            return check_trusted(os.lstat(self.path / DB_NAME), os.geteuid()) is None
        except FileNotFoundError:
            return True

    def _discard(self) -> None:
        try:
            if os.path.islink(self.path) or self.path.is_file():
                os.unlink(self.path)
            else:
                shutil.rmtree(self.path, ignore_errors=True)
        except FileNotFoundError:
            pass

    def _connect(self) -> sqlite3.Connection:
        self.path.mkdir(mode=0o755, exist_ok=True)
        db = sqlite3.connect(str(self.path / DB_NAME), timeout=30)
        db.execute("CREATE TABLE IF NOT EXISTS entries (sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                   "image TEXT NOT NULL, last_used REAL NOT NULL)")
        db.commit()
        return db

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            fresh = not self._usable_dir()
            if fresh:
                self._discard()
            try:
                self._db = self._connect()
                self._db.execute("SELECT count(*) FROM entries").fetchone()
            except sqlite3.DatabaseError as exc:
                if "locked" in str(exc):
                    raise
                fresh = True
                self._discard()
                self._db = self._connect()
            if fresh:
                self._fill_from_files()
        return self._db

    def rebuild(self) -> None:
        """Throw the index away and recreate it from the artifact files."""
        self.close()
        self._discard()
        self._db = self._connect()
        self._fill_from_files()

    def _fill_from_files(self) -> None:
        if not self.artifacts_dir.is_dir():
            return
        for path in self.artifacts_dir.iterdir():
            st = os.lstat(path)
            if SHA256.fullmatch(path.name) and stat.S_ISREG(st.st_mode):
                self._put(path.name, st.st_size, "", st.st_atime)

    def _put(self, sha256: str, size: int, image: str, last_used: float) -> None:
        db = self._db if self._db is not None else self._open()
        with db:
            db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?)",
                       (check_sha256(sha256), int(size), str(image), float(last_used)))

    def touch(self, sha256: str, size: int, image: str) -> None:
        self._put(sha256, size, image, time.time())

    def forget(self, sha256: str) -> None:
        db = self._open()
        with db:
            db.execute("DELETE FROM entries WHERE sha256 = ?", (check_sha256(sha256),))

    def entries(self) -> List[IndexEntry]:
        rows = self._open().execute("SELECT sha256, size, image, last_used FROM entries").fetchall()
        found = [IndexEntry(str(r[0]), int(r[1]), str(r[2]), float(r[3])) for r in rows
                 if isinstance(r[0], str) and SHA256.fullmatch(r[0])]
        return sorted(found, key=lambda e: e.last_used)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _lock_path(pins_dir: Path, sha256: str) -> Path:
    return pins_dir / f"{check_sha256(sha256)}.lock"


def open_lock(path: Path):
    """The writer's lock or pin file: created 0444 by the writer, never through a link,
    and only reused when the writer owns it (read-only opens suffice for flock)."""
    return os.fdopen(open_owned(path, os.O_RDONLY | os.O_CREAT, 0o444), "rb")


def open_pin_as_reader(path: Path, writer: int):
    """A reader's pin: the writer's 0444 file, opened read-only without following links."""
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    except OSError as exc:
        raise ImageError(f"cannot pin {path}: {exc}",
                         hint="ask the cache's owner to pull the image again (vmloader cache serve must run)",
                         phase="cache lookup") from None
    why = check_trusted(os.fstat(fd), writer)
    if why:
        os.close(fd)
        raise ImageError(f"refusing the pin file {path}: {why}", phase="cache lookup")
    return os.fdopen(fd, "rb")


def lock_shared(handle, path: Path, wait: float = PIN_WAIT, sleep: Callable[[float], None] = time.sleep) -> None:
    """A shared lock, waiting at most `wait` seconds for an exclusive holder (an eviction) to let go."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ImageError(f"could not pin {path}: another process held it exclusively for {wait:.0f} s",
                                 hint="the image is being removed from the cache; try again",
                                 phase="cache lookup") from None
            sleep(0.1)


@contextmanager
def pinned(pins_dir: Path, shas: Iterable[str], writer: Optional[int] = None) -> Iterator[None]:
    """Hold shared pins on these artifacts for the duration of the block.

    writer None: we are the writer (the pin files are made if missing); else a reader of `writer`'s cache.
    """
    if writer is None:
        pins_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    with ExitStack() as stack:
        for sha in shas:
            path = _lock_path(pins_dir, sha)
            opened = open_lock(path) if writer is None else open_pin_as_reader(path, writer)
            handle = stack.enter_context(opened)
            lock_shared(handle, path)
        yield


def ensure_pin_files(pins_dir: Path, shas: Iterable[str]) -> None:
    """The writer makes each artifact's pin file, so readers can pin it."""
    pins_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    for sha in shas:
        open_lock(_lock_path(pins_dir, sha)).close()


@contextmanager
def exclusive_if_unpinned(pins_dir: Path, sha256: str) -> Iterator[bool]:
    """Yields True (holding the exclusive lock) when no job pins the artifact."""
    pins_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
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

"""HTTP downloads into the cache: streamed, resumable, verified, single-flight.

A download goes to `<cache>/tmp/<sha256>.part` under an exclusive flock on
`<sha256>.lock`, so N processes needing the same artifact cause one download:
the others wait for the lock and then find the artifact cached. An interrupted
transfer resumes with a Range request; the file only enters the cache after
its sha256 matches (ImageCache.insert_file re-reads the file as it lies on disk,
not the network stream, then renames it into place). The partial file is opened
with O_NOFOLLOW, created 0600, and reused only when the writer owns it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Protocol

from .cacheindex import open_lock
from .catalog import Artifact
from .errors import ImageError
from .ownedfiles import open_owned

if TYPE_CHECKING:
    import requests             # (imported where a download runs: it is slow to import)

CHUNK = 1 << 20
RETRIES = 6
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 30


class ProgressSink(Protocol):
    """What a download reports its progress to: Progress here, cacheservice.RemoteProgress for a client."""

    def update(self, done: int) -> None: ...


class Progress:
    """A progress bar on a TTY, plain log lines (every 10%) otherwise."""

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total = label, max(total, 1)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_step = -1
        self.started = time.monotonic()

    def update(self, done: int) -> None:
        fraction = min(done / self.total, 1.0)
        step = int(fraction * (100 if self.tty else 10))
        if step == self.last_step:
            return
        self.last_step = step
        rate = done / max(time.monotonic() - self.started, 1e-3) / 2 ** 20
        if self.tty:
            bar = "#" * int(fraction * 30)
            self.stream.write(f"\r{self.label} [{bar:<30}] {fraction:4.0%} {rate:6.1f} MiB/s")
            if fraction >= 1.0:
                self.stream.write("\n")
        else:
            self.stream.write(f"vmloader: {self.label}: {fraction:.0%} ({done} of {self.total} bytes)\n")
        self.stream.flush()


@contextmanager
def artifact_lock(lock_path: Path) -> Iterator[None]:
    with open_lock(lock_path) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Written:
    """sha256 of exactly the bytes in the partial file, kept while they are written,
    so verification needs no second read of a large download."""

    def __init__(self, part: Path):
        self.digest = hashlib.sha256()
        self.size = 0
        if os.path.lexists(part):
            with os.fdopen(open_owned(part, os.O_RDONLY), "rb") as handle:
                for block in iter(lambda: handle.read(CHUNK), b""):
                    self.add(block)

    def add(self, block: bytes) -> None:
        self.digest.update(block)
        self.size += len(block)

    def restart(self) -> None:
        self.digest, self.size = hashlib.sha256(), 0


def _transfer(session: requests.Session, url: str, part: Path, written: _Written, progress: ProgressSink) -> None:
    """Fetch the rest of `url` into `part` (resuming from what is already written)."""
    headers = {"Range": f"bytes={written.size}-"} if written.size else {}
    with session.get(url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)) as resp:
        if resp.status_code == 416 and written.size:
            return                                   # nothing left to fetch
        if resp.status_code == 404:
            raise ImageError(f"{url}: not found on the repository (HTTP 404)",
                             hint="the manifest names a file the repository does not have: republish it",
                             phase="cache lookup")
        resp.raise_for_status()
        if resp.status_code != 206:
            written.restart()                        # the server ignored Range: start over
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if written.size else os.O_TRUNC)
        with os.fdopen(open_owned(part, flags, 0o600), "wb") as out:
            for block in resp.iter_content(CHUNK):
                out.write(block)
                written.add(block)
                progress.update(written.size)


def download(session: requests.Session, url: str, artifact: Artifact, part: Path,
             *, progress: Optional[ProgressSink] = None, sleep: Callable[[float], None] = time.sleep) -> str:
    """Download `url` to `part`, resuming and retrying; returns the sha256 of what was sent.

    The caller hashes the file again from disk (ImageCache.insert_file) before caching.
    """
    import requests
    progress = progress or Progress(Path(url).name, artifact.size)
    written = _Written(part)
    for attempt in range(RETRIES):
        try:
            _transfer(session, url, part, written, progress)
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            if attempt == RETRIES - 1:
                raise ImageError(f"download of {url} failed after {RETRIES} attempts: {exc}",
                                 hint="check the repository is up (the partial file is kept to resume)",
                                 phase="cache lookup") from None
            sleep(min(0.5 * 2 ** attempt, 8.0))
        except requests.HTTPError as exc:
            raise ImageError(f"download of {url} failed: {exc}", phase="cache lookup") from None
        except OSError as exc:
            part.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise ImageError(f"the disk filled up while downloading {url}; the partial file was removed",
                                 hint=f"free space in {part.parent} or shrink the cache (vmloader images prune)",
                                 phase="cache lookup") from None
            raise ImageError(f"cannot write {part}: {exc}", phase="cache lookup") from None
    return written.digest.hexdigest()


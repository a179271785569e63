"""Opening files in the image cache without following links or trusting strangers.

The shared cache has one writer (its owner). Everything it opens there is
opened with O_NOFOLLOW, and anything found on disk (a lock, a stamp, a partial
download, a saved manifest) is only reused when it is a regular file owned by
the writer that nobody else can write. A reader trusts a file on the same terms.
"""
import errno
import os
import stat
from pathlib import Path
from typing import Optional

from .errors import ImageError

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _refuse(path: Path, why: str) -> ImageError:
    return ImageError(f"refusing to use {path}: {why}",
                      hint="something other than the cache's owner put it there: remove it "
                           "(as the cache's owner) and try again",
                      phase="cache lookup")


def check_trusted(st: os.stat_result, uid: int) -> Optional[str]:
    """Why a file with this stat is not to be trusted (None: it is)."""
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if st.st_uid != uid:
        return f"it is owned by uid {st.st_uid}, not by the cache's owner (uid {uid})"
    if st.st_mode & 0o022:
        return f"others may write it (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def open_owned(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open for the writer: never through a link, and only a file it owns that nobody else can write."""
    try:
        fd = os.open(path, flags | NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(path, "it is a symbolic link") from None
        raise
    why = check_trusted(os.fstat(fd), os.geteuid())
    if why:
        os.close(fd)
        raise _refuse(path, why)
    return fd


def create_exclusive(path: Path, mode: int = 0o644) -> int:
    """A new file, created by us (O_EXCL: an existing name or a link fails)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, mode)
    except FileExistsError:
        raise _refuse(path, "it already exists") from None


def read_trusted(path: Path, uid: int, limit: int = 64 << 20) -> Optional[bytes]:
    """The bytes of `path` when it is a regular file owned by `uid` that no one else can write; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    except OSError:
        return None
    try:
        if check_trusted(os.fstat(fd), uid):
            return None
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(limit)
    finally:
        os.close(fd)


def owner_of(path: Path) -> Optional[int]:
    try:
        return os.lstat(path).st_uid
    except OSError:
        return None

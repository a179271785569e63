"""Cached artifacts stay what was verified: a file changed since then is hashed again.

Hashing every base before every job would cost seconds on a fast (KVM) worker,
so each artifact gets a stamp when it is verified (`<cache>/verified/<sha256>`:
size, mtime, ctime, inode). A job trusts an artifact whose stamp still matches;
anything that rewrote, truncated or replaced the file changes its ctime, so it
is re-hashed, and removed when its bytes no longer match its name.
(Silent media errors leave no stamp change: `vmloader images verify` re-hashes all.)

A stamp counts only when the cache's writer made it (a regular file it owns that
nobody else can write): a forged stamp is ignored, so the file is hashed again.
"""
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

from .errors import ImageError
from .ownedfiles import create_exclusive, read_trusted


def _stamp(path: Path) -> Optional[list]:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class Stamps:
    def __init__(self, root: Path, writer: Optional[int] = None):
        self.root = Path(root)
        self.writer = os.geteuid() if writer is None else writer      # whose stamps count

    def record(self, path: Path, sha256: str) -> None:
        """After `path` was hashed to `sha256` (a reader, or a read-only cache, just goes unstamped)."""
        if self.writer != os.geteuid():
            return
        tmp = self.root / f".{sha256}.{os.getpid()}.{time.monotonic_ns()}"
        try:
            self.root.mkdir(mode=0o755, exist_ok=True)
            fd = create_exclusive(tmp)
        except (OSError, ImageError):
            return                                  # unstamped: the file is just hashed again next time
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(_stamp(path)))
            os.replace(tmp, self.root / sha256)
        except OSError:
            tmp.unlink(missing_ok=True)

    def unchanged(self, path: Path, sha256: str) -> bool:
        raw = read_trusted(self.root / sha256, self.writer, limit=4096)
        try:
            saved = json.loads(raw) if raw is not None else None
        except ValueError:
            return False
        return saved is not None and saved == _stamp(path)

    def forget(self, sha256: str) -> None:
        try:
            (self.root / sha256).unlink()
        except OSError:
            pass


def check_intact(path: Path, sha256: str, stamps: Stamps, hash_file: Callable[[Path], str],
                 remove: Callable[[str], None]) -> bool:
    """True when `path` still holds `sha256`; a damaged file is removed (and False returned)."""
    if stamps.unchanged(path, sha256):
        return True
    try:
        actual = hash_file(path)
    except OSError as exc:
        raise ImageError(f"cannot read the cached file {path}: {exc}", phase="cache lookup") from None
    if actual == sha256:
        stamps.record(path, sha256)
        return True
    remove(sha256)
    stamps.forget(sha256)
    return False

"""Cached artifacts stay what was verified: a file changed since then is hashed again.

Hashing every base before every job would cost seconds on a fast (KVM) worker,
so each artifact gets a stamp when it is verified (`<cache>/verified/<sha256>`:
size, mtime, ctime, inode). A job trusts an artifact whose stamp still matches;
anything that rewrote, truncated or replaced the file changes its ctime, so it
is re-hashed, and removed when its bytes no longer match its name.
(Silent media errors leave no stamp change: `vmloader images verify` re-hashes all.)
"""
import json
import os
from pathlib import Path
from typing import Callable, Optional

from .errors import ImageError


def _stamp(path: Path) -> Optional[list]:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class Stamps:
    def __init__(self, root: Path):
        self.root = Path(root)

    def record(self, path: Path, sha256: str) -> None:
        """After `path` was hashed to `sha256` (a read-only cache just goes unstamped)."""
        try:
            self.root.mkdir(exist_ok=True)
            tmp = self.root / f".{sha256}.{os.getpid()}"
            tmp.write_text(json.dumps(_stamp(path)))
            tmp.replace(self.root / sha256)
        except OSError:
            pass

    def unchanged(self, path: Path, sha256: str) -> bool:
        try:
            saved = json.loads((self.root / sha256).read_text())
        except (OSError, ValueError):
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

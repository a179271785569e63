"""What a file-system diff compares of one path, whoever listed the tree."""
import stat
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Entry:
    """What is compared of one path in a tree (never followed: a symlink is itself)."""
    kind: str                       # file, dir, symlink, other (device, fifo, socket)
    size: int
    mode: int                       # permission bits and type
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    target: Optional[str] = None    # symlinks only


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "symlink" if stat.S_ISLNK(mode) else "other"

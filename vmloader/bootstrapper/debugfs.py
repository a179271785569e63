"""debugfs's listing of an ext2/3/4 file system, read without trusting it.

Every name and byte in a guest's file system is the guest's choice. debugfs prints
directory entries with their names raw (`ls -p`: `/ino/mode/uid/gid/name/size/`), so a
name can hold a newline, ESC or text that looks like debugfs's own output. The parser
therefore never searches for markers: it knows the exact list of commands it sent and
consumes the output from the start, each command's echo (`debugfs: ls -p <12>`) where it
must be, each record by its fixed shape. A name cannot hold `/` or NUL, so a record's
name ends at the one `/` before the size. Inode metadata is never read from `stat`'s prose
(it prints link targets and extended attributes raw): `imap` says where each inode lies
in the image, and its fixed-size fields are decoded from those bytes (decode_inode).
Symlink targets come from the inode's bytes or from `cat`, with the length the inode
gives. Anything else raises DebugfsOutputError.

(`inode_dump` would print the inode itself, but debugfs writes its stdout unbuffered,
a byte or two per write: 1.4 ms an inode through a pipe, 20 s for a Debian image;
`imap` prints two lines.)
"""
import re
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

_LS_RECORD = re.compile(rb"/(\d{1,10})/([0-7]{1,7})/(\d{1,10})/(\d{1,10})/([^/]*)/(\d{0,20})/\n")
_IMAP = re.compile(rb"Inode (\d{1,10}) is part of block group \d{1,10}\n\tlocated at block (\d{1,20}), "
                   rb"offset 0x([0-9a-f]{1,8})\n")
# i_mode, i_uid, i_size_lo, i_ctime, i_mtime (0x0C), i_gid (0x18), i_flags (0x20), i_block (0x28),
# i_size_high (0x6C), i_uid_high, i_gid_high (0x78), i_extra_isize (0x80), i_ctime_extra, i_mtime_extra (0x84)
_INODE = struct.Struct("<HHI4xii4xH6xI4x60s8xI8xHH4xH2xII")
INODE_BYTES = 160                # the fields decode_inode reads, up to i_atime_extra
EXTENTS_FL, INLINE_DATA_FL = 0x80000, 0x10000000
ROOT_INO = 2
MAX_LINK = 4096                  # a longer symlink target is not read (PATH_MAX)


class DebugfsOutputError(ValueError):
    """debugfs's output is not what the commands sent can produce (a damaged or hostile file system)."""


@dataclass(frozen=True)
class Command:
    verb: str                    # ls, imap, cat
    ino: int
    size: int = 0                # cat: how many bytes the inode says it holds

    def text(self) -> str:
        return {"ls": "ls -p", "imap": "imap", "cat": "cat"}[self.verb] + f" <{self.ino}>"


def script(commands: Sequence[Command]) -> bytes:
    return b"".join(c.text().encode() + b"\n" for c in commands)


@dataclass(frozen=True)
class DirEntry:
    name: bytes
    ino: int
    mode: int


@dataclass(frozen=True)
class Inode:
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    flags: int
    block: bytes                 # i_block: a fast symlink's target lives here

    def fast_link_target(self) -> Optional[bytes]:
        """The target of a symlink stored in the inode itself; None when it is in a data block."""
        if self.size < 60 and not self.flags & (EXTENTS_FL | INLINE_DATA_FL):
            return self.block[:self.size]
        return None


@dataclass(frozen=True)
class Location:
    """Where an inode lies: in `block`, `offset` bytes in."""
    block: int
    offset: int


Result = Union[List[DirEntry], Optional[Location], bytes]


def parse(output: bytes, commands: Sequence[Command]) -> List[Result]:
    """One result per command, in order: ls → entries (without . and ..), imap → Location
    (None when debugfs printed nothing for it: a bad inode number), cat → the bytes."""
    pos, results = 0, []
    for index, command in enumerate(commands):
        echo = b"debugfs: " + command.text().encode() + b"\n"
        if not output.startswith(echo, pos):
            raise DebugfsOutputError(f"expected the echo of `{command.text()}` at byte {pos}")
        pos += len(echo)
        if command.verb == "ls":
            result, pos = _ls(output, pos)
        elif command.verb == "imap":
            result, pos = _imap(output, pos, command.ino)
        else:
            result, pos = _cat(output, pos, command, commands[index + 1] if index + 1 < len(commands) else None)
        results.append(result)
    if pos != len(output):
        raise DebugfsOutputError(f"{len(output) - pos} unexpected bytes at the end")
    return results


def _ls(output: bytes, pos: int) -> tuple:
    entries = []
    while True:
        match = _LS_RECORD.match(output, pos)
        if not match:
            break
        ino, mode, _uid, _gid, name, _size = match.groups()
        if name not in (b".", b".."):
            entries.append(DirEntry(name, int(ino), int(mode, 8)))
        pos = match.end()
    if output.startswith(b"\n", pos):
        pos += 1
    return entries, pos


def _imap(output: bytes, pos: int, ino: int) -> tuple:
    match = _IMAP.match(output, pos)
    if not match:
        return None, pos
    if int(match.group(1)) != ino:
        raise DebugfsOutputError(f"imap of inode {ino} answered for inode {int(match.group(1))}")
    return Location(int(match.group(2)), int(match.group(3), 16)), match.end()


def _cat(output: bytes, pos: int, command: Command, following: Optional[Command]) -> tuple:
    end = pos + command.size
    rest_ok = end == len(output) if following is None else \
        output.startswith(b"debugfs: " + following.text().encode() + b"\n", end)
    if not rest_ok:
        raise DebugfsOutputError(f"`{command.text()}` did not print the {command.size} bytes its inode holds")
    return output[pos:end], end


def decode_inode(raw: bytes) -> Inode:
    """The fields of an ext2/3/4 on-disk inode (struct ext4_inode, little-endian) that a diff compares."""
    if len(raw) < 128:
        raise DebugfsOutputError(f"an inode of {len(raw)} bytes")
    raw = raw.ljust(INODE_BYTES, b"\0")
    (mode, uid_lo, size_lo, ctime, mtime, gid_lo, flags, block, size_hi, uid_hi, gid_hi, extra_isize,
     ctime_extra, mtime_extra) = _INODE.unpack_from(raw)
    return Inode(mode, uid_lo | uid_hi << 16, gid_lo | gid_hi << 16, size_lo | size_hi << 32,
                 _ns(mtime, mtime_extra if extra_isize >= 12 else 0),
                 _ns(ctime, ctime_extra if extra_isize >= 8 else 0), flags, block)


def _ns(seconds: int, extra: int) -> int:
    """ext4's timestamps: 32 signed bits of seconds, extended by the extra field's two epoch bits
    and its 30 bits of nanoseconds."""
    return (seconds + ((extra & 3) << 32)) * 1_000_000_000 + (extra >> 2)

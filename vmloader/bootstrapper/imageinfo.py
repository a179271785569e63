"""`vmloader images inspect`: what an image's disk holds, read offline, without booting it.

The partition table and boot mode come from the disk's first sectors, the root file
system's type from its superblock, and for ext2/3/4 a few files (/etc/os-release,
/boot, python3, cloud-init, qemu-guest-agent, vmloader's agent) are looked up with
debugfs. Like `snapshot diff` (guestdisk.py), every parser runs as an unprivileged user
when root asks, on scratch copies it owns; the disk is a user's or a distribution's file
and each of its bytes is hostile: reads are bounded, text from it is escaped
(guesttext.py), and a symlink is resolved inside the image's own root (`..` at the root
stays there, absolute targets start again from it), never on the host.
"""
import json
import re
import shlex
import stat
import struct
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from . import bootmode, debugfs, guestdisk
from .errors import ImageError, VMLoaderError
from .guesttext import cap, escape
from .proc import Identity

PHASE = "images inspect"
HEAD_BYTES = 64 * 1024           # MBR, GPT header and entries; an ext superblock on a whole disk
FS_HEAD_BYTES = 128 * 1024       # a file system's superblock (Btrfs's lies at 64 KiB)
MAX_TEXT = 64 * 1024             # os-release read at most
MAX_LISTING = 16 * 1024 * 1024   # debugfs output for one directory
MAX_LINK_HOPS = 40               # as the kernel's MAXSYMLINKS
MAX_STEPS = 256                  # path components looked at while resolving one path
MAX_KERNELS = 32
MAX_VALUE = 200                  # bytes of one os-release value shown
DISK_FORMATS = ("qcow2", "raw")
OS_RELEASE_KEYS = ("PRETTY_NAME", "ID", "VERSION_ID")
CLOUD_INIT = ("/usr/bin/cloud-init",)
QEMU_GA = ("/usr/sbin/qemu-ga", "/usr/bin/qemu-ga")
VMLOADER_AGENT = ("/usr/lib/vmloader", "/etc/systemd/system/vmloader-agent.service")
PYTHON3 = "/usr/bin/python3"

_MBR_NAMES = {0x83: "Linux", 0x82: "Linux swap", 0x8E: "Linux LVM", 0xEF: "EFI System", 0xEE: "GPT protective",
              0x05: "Extended", 0x0F: "Extended", 0x07: "NTFS/exFAT", 0x0B: "FAT32", 0x0C: "FAT32"}
_GPT_NAMES = {bootmode.ESP_GUID: "EFI System", "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
              "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux",
              "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
              "44479540-f297-41b2-9af7-d131d5f0458a": "Linux root (x86)",
              "b921b045-1df0-41c3-af44-4c6f280d3fae": "Linux root (ARM64)",
              "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
              "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
              "bc13c2ff-59e6-4262-a352-b275fd6f7172": "Linux extended boot"}
_LINUX = {"83"} | {guid for guid, name in _GPT_NAMES.items() if name == "Linux" or name.startswith("Linux root")}


@dataclass(frozen=True)
class Partition:
    number: int
    start: int                   # bytes
    size: int                    # bytes
    type: str                    # MBR: two hex digits; GPT: the type GUID
    kind: str                    # what the type means, "unknown" otherwise

    def linux(self) -> bool:
        return self.type in _LINUX


@dataclass(frozen=True)
class Python3:
    path: str                    # where the last link led, inside the image
    version: Optional[str]       # from that name (python3.11 -> 3.11), None when it does not say


@dataclass(frozen=True)
class ImageInfo:
    disk: str
    format: str
    virtual_size: int
    table: Optional[str]         # mbr, gpt, None (a file system on the whole disk, or nothing known)
    partitions: Tuple[Partition, ...]
    boot: Optional[str]          # uefi, bios, None: what the disk's first sectors say (bootmode.py)
    root_partition: Optional[int]
    filesystem: str              # ext2, ext3, ext4, xfs, btrfs, unknown
    contents_read: bool          # False: the file system's contents cannot be read offline
    os_release: Dict[str, str] = field(default_factory=dict)
    kernels: Tuple[str, ...] = ()
    python3: Optional[Python3] = None
    cloud_init: bool = False
    qemu_guest_agent: bool = False
    vmloader_agent: bool = False
    catalogue_boot: Optional[str] = None   # the boot mode the catalogue entry records

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> List[str]:
        size = f"{self.virtual_size / 2**30:.1f} GiB"
        out = [f"disk              {escape(self.disk)} ({self.format}, {size})"]
        if self.table:
            out.append(f"partition table   {self.table}")
            out += [f"  {p.number:<3} {p.kind:22} {p.size / 2**20:10.0f} MiB  type {p.type}" for p in self.partitions]
        else:
            out.append("partition table   none")
        boot = self.boot or "none found (no EFI system partition in a GPT, no boot code in the MBR)"
        if self.catalogue_boot and self.catalogue_boot != self.boot:
            boot += f"; the catalogue says {self.catalogue_boot}"
        out.append(f"boot mode         {boot}")
        where = f", partition {self.root_partition}" if self.root_partition else ""
        out.append(f"root file system  {self.filesystem}"
                   f"{'' if self.contents_read else ' (contents not readable offline)'}{where}")
        if not self.contents_read:
            return out
        release = self.os_release
        name = release.get("PRETTY_NAME", "no /etc/os-release")
        ids = ", ".join(f"{k.lower()} {release[k]}" for k in ("ID", "VERSION_ID") if k in release)
        out.append(f"os                {name}{f' ({ids})' if ids else ''}")
        out.append(f"kernels in /boot  {', '.join(self.kernels) or 'none'}")
        py = self.python3
        out.append(f"python3           {'no' if py is None else (py.version or 'yes') + ' (' + py.path + ')'}")
        out += [f"{label:17} {'yes' if getattr(self, attr) else 'no'}" for label, attr in
                (("cloud-init", "cloud_init"), ("qemu-guest-agent", "qemu_guest_agent"),
                 ("vmloader agent", "vmloader_agent"))]
        return out


def partitions(head: bytes) -> Tuple[Optional[str], Tuple[Partition, ...]]:
    """The table type and its partitions, read from the disk's first bytes with bounds checks
    (GPT first: its protective MBR is an MBR too). Logical partitions are not followed."""
    if head[bootmode.SECTOR:bootmode.SECTOR + 8] == b"EFI PART":
        return "gpt", _gpt(head)
    if len(head) < bootmode.SECTOR or head[510:512] != b"\x55\xaa":
        return None, ()
    found = []
    for n in range(4):
        entry = head[446 + 16 * n:446 + 16 * (n + 1)]
        kind, = struct.unpack_from("<B", entry, 4)
        start, sectors = struct.unpack_from("<II", entry, 8)
        if kind and sectors:
            found.append(Partition(n + 1, start * bootmode.SECTOR, sectors * bootmode.SECTOR, f"{kind:02x}",
                                   _MBR_NAMES.get(kind, "unknown")))
    if not found and not any(head[446:510]):
        return None, ()          # a boot sector's signature with no table (an ext file system's own is zero)
    return "mbr", tuple(found)


def _gpt(head: bytes) -> Tuple[Partition, ...]:
    header = head[bootmode.SECTOR:2 * bootmode.SECTOR]
    entries_lba, count, size = struct.unpack_from("<QII", header, 72)
    if size < 128 or size > 4096 or count > 1024:
        return ()
    found = []
    for n in range(count):
        start = entries_lba * bootmode.SECTOR + n * size
        entry = head[start:start + 128]
        if len(entry) < 128:
            break                # the rest of the table lies beyond what was read
        if entry[:16] == bytes(16):
            continue
        guid = bootmode._guid(entry[:16])
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last >= first:
            found.append(Partition(n + 1, first * bootmode.SECTOR, (last - first + 1) * bootmode.SECTOR, guid,
                                   _GPT_NAMES.get(guid, "unknown")))
    return tuple(found)


def filesystem_type(fs_head: bytes) -> str:
    """ext2/ext3/ext4 (by the superblock's features), xfs, btrfs, or unknown."""
    if fs_head[1080:1082] == b"\x53\xef" and len(fs_head) >= 2048:
        compat, incompat = struct.unpack_from("<II", fs_head, 1024 + 0x5C)
        if incompat & 0x2C0:     # extents, 64bit, flex_bg
            return "ext4"
        return "ext3" if compat & 0x4 else "ext2"    # has_journal
    if fs_head[:4] == b"XFSB":
        return "xfs"
    if fs_head[65600:65608] == b"_BHRfS_M":
        return "btrfs"
    return "unknown"


def parse_os_release(text: bytes) -> Dict[str, str]:
    """PRETTY_NAME, ID and VERSION_ID (os-release(5): shell-style assignments), escaped and capped."""
    found: Dict[str, str] = {}
    for line in text[:MAX_TEXT].decode("utf-8", "surrogateescape").splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or key not in OS_RELEASE_KEYS:
            continue
        try:
            words = shlex.split(value)
        except ValueError:
            continue
        if words:
            found[key] = cap(escape(words[0]), MAX_VALUE)
    return found


def python_version(path: str) -> Optional[str]:
    match = re.fullmatch(r"python(\d{1,2}\.\d{1,3})", path.rsplit("/", 1)[-1])
    return match.group(1) if match else None


class Tree:
    """Paths of an ext file system looked up with debugfs, symlinks resolved inside its root."""

    def __init__(self, reader: guestdisk.Reader, raw: str, table: guestdisk.InodeTable):
        self.reader, self.raw, self.table = reader, raw, table
        self.listings: Dict[int, Dict[bytes, debugfs.DirEntry]] = {}

    def _round(self, command: debugfs.Command, max_output: int):
        result = self.reader.run(["debugfs", "-f", "-", self.raw], timeout=120, max_output=max_output,
                                 input=debugfs.script([command]), check=False)
        try:
            return debugfs.parse(result.stdout, [command])[0]
        except debugfs.DebugfsOutputError as exc:
            raise ImageError(f"could not read the root file system: debugfs printed what its commands cannot "
                             f"produce ({exc})", hint="the file system is damaged (or hostile)",
                             phase=PHASE) from None

    def listing(self, ino: int) -> Dict[bytes, debugfs.DirEntry]:
        if ino not in self.listings:
            self.listings[ino] = {e.name: e for e in self._round(debugfs.Command("ls", ino), MAX_LISTING)}
        return self.listings[ino]

    def inode(self, ino: int) -> Optional[debugfs.Inode]:
        where = self._round(debugfs.Command("imap", ino), 4096)
        return self.table.read(where) if where else None

    def cat(self, ino: int, inode: debugfs.Inode, limit: int) -> Optional[bytes]:
        if inode.size > limit:
            return None
        return self._round(debugfs.Command("cat", ino, inode.size), inode.size + 4096)

    def link_target(self, ino: int, inode: debugfs.Inode) -> Optional[bytes]:
        target = inode.fast_link_target()
        return target if target is not None else self.cat(ino, inode, debugfs.MAX_LINK)

    def resolve(self, path: str) -> Optional[Tuple[str, int, debugfs.Inode]]:
        """(the path it leads to, inode number, inode) of `path`, every symlink followed inside the
        image's root; None when missing, a loop, or unreadable."""
        todo = [c for c in path.encode().split(b"/") if c]
        where: List[Tuple[bytes, int]] = []          # the directories walked: (name, inode)
        hops = steps = 0
        while todo:
            steps += 1
            if steps > MAX_STEPS:
                return None          # a hostile tree of links into deep directories: each step is a debugfs run
            name = todo.pop(0)
            if name == b".":
                continue
            if name == b"..":
                where = where[:-1]
                continue
            entry = self.listing(where[-1][1] if where else debugfs.ROOT_INO).get(name)
            if entry is None:
                return None
            if stat.S_ISLNK(entry.mode):
                hops += 1
                inode = self.inode(entry.ino)
                target = self.link_target(entry.ino, inode) if inode and hops <= MAX_LINK_HOPS else None
                if not target:
                    return None
                where = [] if target.startswith(b"/") else where
                todo = [c for c in target.split(b"/") if c] + todo
                continue
            if todo and not stat.S_ISDIR(entry.mode):
                return None
            where.append((name, entry.ino))
        ino = where[-1][1] if where else debugfs.ROOT_INO
        inode = self.inode(ino)
        resolved = cap("/" + "/".join(escape(name) for name, _ in where), MAX_VALUE * 4)
        return (resolved, ino, inode) if inode else None

    def exists(self, path: str) -> bool:
        return self.resolve(path) is not None


def read_contents(tree: Tree) -> dict:
    """What `ImageInfo` says of the file system's contents."""
    release: Dict[str, str] = {}
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        found = tree.resolve(path)
        if found and stat.S_ISREG(found[2].mode):
            release = parse_os_release(tree.cat(found[1], found[2], MAX_TEXT) or b"")
            break
    kernels: List[str] = []
    boot = tree.resolve("/boot")
    if boot and stat.S_ISDIR(boot[2].mode):
        names = sorted(n for n, e in tree.listing(boot[1]).items()
                       if re.match(rb"vmlinu[xz]-", n) and not stat.S_ISDIR(e.mode))
        kernels = [cap(escape(n[8:]), MAX_VALUE) for n in names[:MAX_KERNELS]]
    python = tree.resolve(PYTHON3)
    return dict(os_release=release, kernels=tuple(kernels),
                python3=Python3(python[0], python_version(python[0]))
                if python and stat.S_ISREG(python[2].mode) else None,
                cloud_init=any(map(tree.exists, CLOUD_INIT)), qemu_guest_agent=any(map(tree.exists, QEMU_GA)),
                vmloader_agent=any(map(tree.exists, VMLOADER_AGENT)))


def _pinned(layer: guestdisk.Layer, fmt: str) -> dict:
    spec: dict = {"driver": fmt, "file": {"driver": "file", "filename": layer.path}}
    if fmt == "qcow2":
        spec["backing"] = None
    return spec


class Inspection:
    """One disk's reading, in a scratch directory the parsers own."""

    def __init__(self, reader: guestdisk.Reader, layer: guestdisk.Layer, fmt: str):
        self.reader, self.layer, self.fmt = reader, layer, fmt

    def info(self) -> dict:
        result = self.reader.run(["qemu-img", "info", "-U", "--output=json",
                                  "json:" + json.dumps(_pinned(self.layer, self.fmt))], timeout=60, check=False)
        try:
            return dict(json.loads(result.stdout))
        except ValueError:
            raise ImageError(f"{self.layer.origin} is not a {self.fmt} disk image qemu-img can read: "
                             f"{guestdisk.first_line(result.stderr)}", phase=PHASE) from None

    def copy(self, offset: int, size: int, name: str) -> str:
        """`size` bytes of the disk from `offset`, as the guest sees them, into a raw scratch file."""
        spec = {"driver": "raw", "offset": offset, "size": size, "file": _pinned(self.layer, self.fmt)}
        self.reader.run(["qemu-img", "convert", "-U", "-O", "raw", "json:" + json.dumps(spec), name], timeout=1800)
        return name

    def read(self, name: str) -> bytes:
        with guestdisk.open_scratch(self.reader.scratch / name, self.reader.identity) as file:
            return file.read(max(HEAD_BYTES, FS_HEAD_BYTES))

    def run(self) -> ImageInfo:
        info = self.info()
        size = int(info.get("virtual-size", 0))
        if size < HEAD_BYTES:
            raise ImageError(f"{self.layer.origin} is too small to hold a bootable disk ({size} bytes)",
                             phase=PHASE)
        head = self.read(self.copy(0, HEAD_BYTES, "head.raw"))
        table, parts = partitions(head)
        root = max((p for p in parts if p.linux() and p.start + p.size <= size), key=lambda p: p.size, default=None)
        start, length = (root.start, root.size) if root else (0, size)
        fs = "none (no Linux partition)" if table and not root else "unknown"
        if (table is None or root) and length >= FS_HEAD_BYTES:
            fs = filesystem_type(self.read(self.copy(start, FS_HEAD_BYTES, "fshead.raw")))
        base = ImageInfo(str(self.layer.origin), self.fmt, size, table, parts, bootmode.detect(head),
                         root.number if root else None, fs, contents_read=fs.startswith("ext"))
        if not base.contents_read:
            return base
        raw = self.copy(start, length, "root.raw")
        self.reader.replay_journal(raw)
        with guestdisk.InodeTable.open(self.reader.scratch / raw, self.reader.identity) as inodes:
            return replace(base, **read_contents(Tree(self.reader, raw, inodes)))


def disk_format(disk: Path, reader: guestdisk.Reader, layer: guestdisk.Layer) -> str:
    """qcow2 or raw, as qemu-img probes it; anything else is refused."""
    result = reader.run(["qemu-img", "info", "-U", "--output=json", layer.path], timeout=60, check=False)
    try:
        fmt = json.loads(result.stdout).get("format")
    except (ValueError, AttributeError):
        fmt = None
    if fmt not in DISK_FORMATS:
        raise ImageError(f"{disk} is not a qcow2 or raw disk image"
                         f"{f' (qemu-img says {escape(str(fmt))})' if fmt else ''}",
                         hint="convert it with qemu-img convert -O qcow2", phase=PHASE)
    return fmt


def inspect(disk: Path, fmt: Optional[str] = None, catalogue_boot: Optional[str] = None,
            parsers_as: Callable[[], Optional[Identity]] = guestdisk.parser_identity) -> ImageInfo:
    """What `disk` holds (its format probed when `fmt` is None); the disk is only read."""
    if not disk.is_file():
        raise ImageError(f"{disk}: no such disk file", phase=PHASE)
    identity = parsers_as()
    try:
        with tempfile.TemporaryDirectory(prefix="vmloader-inspect-") as work:
            reader = guestdisk.Reader(guestdisk.scratch_dir(Path(work), identity), identity, phase=PHASE)
            layer = guestdisk.stage(reader, disk, "disk", str(disk))
            fmt = fmt or disk_format(disk, reader, layer)
            found = Inspection(reader, layer, fmt).run()
    except ImageError:
        raise
    except VMLoaderError as exc:
        raise ImageError(f"could not read {disk}: {exc.message}", hint=exc.hint or "qemu-img check says whether "
                         "it is damaged", phase=PHASE) from None
    return replace(found, catalogue_boot=catalogue_boot)

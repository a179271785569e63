"""A guest's disk read in user space, with no kernel or FUSE mount, and never with root's privileges.

The guest chose every byte of its file system, and e2fsprogs has had CVEs, so what
parses it runs as an unprivileged user: the caller itself when it is not root (the
snapshot's owner, reading their own snapshot), and when root runs it, children that
dropped to `nobody` with no supplementary groups. Root itself only opens the snapshot's
two qcow2 files and copies them into a private scratch directory the children own.

1. qemu-img converts each qcow2 chain (snapshot over base, base alone) into a sparse raw
   file, every format pinned: the chain is spelled out in a json: filename, nothing probed.
2. e2fsck replays the guest's journal on the raw copy (`-E journal_only`): the guest was
   stopped without unmounting, so committed changes may still sit in the journal.
3. debugfs lists the tree, a round per directory depth (see debugfs.py): entries by
   inode number, and where each inode lies; its fixed-size fields (mode, owner, size,
   times) are then decoded from those bytes of the scratch copy. Output and time are bounded.

ext2/3/4 on the whole disk, or in one Linux partition of an MBR or GPT table, can be read;
anything else gets a message naming what was found.
"""
import contextlib
import json
import os
import pwd
import stat
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from . import debugfs, proc
from .errors import SnapshotError, VMLoaderError
from .fstree import Entry, kind_of
from .guesttext import cap, escape
from .proc import Identity

PHASE = "snapshot diff"
MAX_ENTRIES = 2_000_000              # paths in one tree
MAX_ROUND_OUTPUT = 256 * 1024 * 1024  # bytes of debugfs output per round
MAX_DEPTH = 4096
ROUND_TIMEOUT = 600.0
Progress = Callable[[str], None]


def parser_identity() -> Optional[Identity]:
    """Who runs the parsers: None (ourselves) unless we are root; then `nobody`."""
    if os.geteuid() != 0:
        return None
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        raise SnapshotError("root reads guest disks only as an unprivileged user, and this host has no "
                            "`nobody` account", hint="create one, or run `snapshot diff` as a normal user",
                            phase=PHASE) from None
    return Identity(nobody.pw_uid, nobody.pw_gid)


@dataclass(frozen=True)
class Layer:
    """A qcow2 file of the chain, where the parsers find it, and what to call it in messages."""
    path: str                        # relative to the scratch dir, or absolute
    origin: Path
    what: str


class Reader:
    """Runs the parsers in `scratch` as `identity` (None: as ourselves)."""

    def __init__(self, scratch: Path, identity: Optional[Identity], progress: Progress = lambda _: None,
                 phase: str = PHASE):
        self.scratch, self.identity, self.progress, self.phase = scratch, identity, progress, phase
        self.ran_as: set = set()     # uids the parsers ran as (shown with --debug)

    def run(self, argv: List[str], timeout: float, max_output: int = 1 << 20, input: bytes = b"",
            check: bool = True):
        result = proc.run_bounded(argv, max_output=max_output, timeout=timeout, input=input,
                                  as_user=self.identity, cwd=str(self.scratch), env=_child_env(), phase=self.phase)
        self.ran_as.add(self.identity.uid if self.identity else os.geteuid())
        if check and result.returncode != 0:
            raise VMLoaderError(f"{argv[0]} failed (exit {result.returncode}): "
                                f"{first_line(result.stderr + result.stdout)}", phase=self.phase)
        return result

    def check(self, layer: Layer) -> None:
        """Refuse a qcow2 file qemu-img finds damaged (exit 3 is leaked clusters only: harmless)."""
        alone = {"driver": "qcow2", "file": {"driver": "file", "filename": layer.path}, "backing": None}
        result = self.run(["qemu-img", "check", "-U", "json:" + json.dumps(alone)], timeout=300, check=False)
        if result.returncode not in (0, 3):
            raise SnapshotError(f"the disk of {layer.what} is damaged ({first_line(result.stderr + result.stdout)}"
                                f"): {layer.origin}", hint=f"`qemu-img check {layer.origin}` says more; nothing "
                                "was changed or removed", phase=PHASE)

    def to_raw(self, chain: List[Layer], raw: str) -> None:
        """The top of `chain` (each layer backed by the next, all qcow2) as one sparse raw file."""
        spec: dict = {"driver": "qcow2", "file": {"driver": "file", "filename": chain[-1].path}, "backing": None}
        for layer in reversed(chain[:-1]):
            spec = {"driver": "qcow2", "file": {"driver": "file", "filename": layer.path}, "backing": spec}
        try:
            self.run(["qemu-img", "convert", "-U", "-O", "raw", "json:" + json.dumps(spec), raw], timeout=1800)
        except VMLoaderError as exc:
            raise SnapshotError(f"could not read the disk of {chain[0].what}: {exc.message}",
                                hint=f"`qemu-img check {chain[0].origin}` says whether it is damaged; is there "
                                     f"room in {self.scratch.parent.parent}?", phase=PHASE) from None

    def replay_journal(self, raw: str) -> None:
        """What the guest committed but did not write back; lands in the scratch copy only."""
        self.run(["e2fsck", "-E", "journal_only", "-p", raw], timeout=600, check=False)

    def extract_partition(self, raw: str, what: str) -> str:
        """The Linux file system inside a partition table, as a raw file of its own."""
        table = self.run(["sfdisk", "--json", raw], timeout=60, check=False)
        start, size = linux_partition(table.stdout, what)
        spec = {"driver": "raw", "offset": start, "size": size, "file": {"driver": "file", "filename": raw}}
        part = raw + ".part"
        self.run(["qemu-img", "convert", "-O", "raw", "json:" + json.dumps(spec), part], timeout=1800)
        return part

    def list_tree(self, raw: str, label: str) -> Dict[str, Entry]:
        with InodeTable.open(self.scratch / raw, self.identity) as table:
            return Walk(self, raw, label, table).run()


class InodeTable:
    """Inodes read straight from the raw copy, at the places debugfs's `imap` gave."""

    def __init__(self, file, block_size: int, inode_size: int):
        self.file, self.block_size, self.inode_size = file, block_size, inode_size

    @classmethod
    @contextlib.contextmanager
    def open(cls, raw: Path, identity: Optional[Identity]):
        with open_scratch(raw, identity) as file:
            sb = os.pread(file.fileno(), 1024, 1024)
            log_block, = struct.unpack_from("<I", sb, 24)
            rev, = struct.unpack_from("<I", sb, 76)
            inode_size = struct.unpack_from("<H", sb, 88)[0] if rev >= 1 else 128
            if log_block > 6 or inode_size < 128 or inode_size > 4096 or inode_size & (inode_size - 1):
                raise SnapshotError(f"the ext superblock of {raw.name} is damaged (block size 2^{10 + log_block}, "
                                    f"inode size {inode_size})", phase=PHASE)
            yield cls(file, 1024 << log_block, inode_size)

    def read(self, where: debugfs.Location) -> Optional[debugfs.Inode]:
        if where.offset + self.inode_size > self.block_size:
            return None
        raw = os.pread(self.file.fileno(), min(self.inode_size, 256), where.block * self.block_size + where.offset)
        return debugfs.decode_inode(raw) if len(raw) >= 128 else None


class Walk:
    """The tree of one raw file system, a debugfs round per directory depth."""

    def __init__(self, reader: Reader, raw: str, label: str, table: InodeTable):
        self.reader, self.raw, self.label, self.table = reader, raw, label, table
        self.paths: Dict[bytes, int] = {b"/": debugfs.ROOT_INO}
        self.inodes: Dict[int, Optional[debugfs.Inode]] = {debugfs.ROOT_INO: None}
        self.targets: Dict[int, bytes] = {}
        self.listed = {debugfs.ROOT_INO}

    def run(self) -> Dict[str, Entry]:
        dirs, dumps = [(b"", debugfs.ROOT_INO)], [debugfs.ROOT_INO]
        cats: List[debugfs.Command] = []
        for _ in range(MAX_DEPTH + 3):
            if not (dirs or dumps or cats):
                return self.entries()
            commands = [debugfs.Command("ls", ino) for _, ino in dirs] + \
                       [debugfs.Command("imap", ino) for ino in dumps] + cats
            results = self.round(commands)
            dirs, dumps = self.found(dirs, results[:len(dirs)])
            cats = self.dumped(commands, results)
            self.reader.progress(f"listing {self.label}: {len(self.paths)} entries")
        raise SnapshotError(f"the file system of the {self.label} is nested deeper than {MAX_DEPTH} "
                            "directories", hint="it is damaged or hostile", phase=PHASE)

    def round(self, commands: List[debugfs.Command]) -> list:
        result = self.reader.run(["debugfs", "-f", "-", self.raw], timeout=ROUND_TIMEOUT,
                                 max_output=MAX_ROUND_OUTPUT, input=debugfs.script(commands), check=False)
        try:
            return debugfs.parse(result.stdout, commands)
        except debugfs.DebugfsOutputError as exc:
            raise SnapshotError(f"could not list the file system of the {self.label}: debugfs printed what its "
                                f"commands cannot produce ({exc}); {first_line(result.stderr)}",
                                hint="the file system is damaged (or hostile)", phase=PHASE) from None

    def found(self, dirs: list, listings: list) -> Tuple[list, list]:
        """The next depth's directories and the inodes not seen yet."""
        next_dirs, new = [], []
        for (parent, _), entries in zip(dirs, listings):
            for item in entries:
                path = parent + b"/" + item.name
                self.paths[path] = item.ino
                if item.ino not in self.inodes:
                    self.inodes[item.ino] = None
                    new.append(item.ino)
                if stat.S_ISDIR(item.mode) and item.ino not in self.listed:
                    self.listed.add(item.ino)
                    next_dirs.append((path, item.ino))
        if len(self.paths) > MAX_ENTRIES:
            raise SnapshotError(f"the file system of the {self.label} has more than {MAX_ENTRIES} entries",
                                hint="too many to compare", phase=PHASE)
        return next_dirs, new

    def dumped(self, commands: list, results: list) -> List[debugfs.Command]:
        """Read the inodes imap located and record what cat printed; the slow symlinks to cat next."""
        cats: List[debugfs.Command] = []
        for command, where in zip(commands, results):
            if command.verb == "imap":
                result = self.table.read(where) if where else None
                self.inodes[command.ino] = result
                if result and stat.S_ISLNK(result.mode):
                    target = result.fast_link_target()
                    if target is not None:
                        self.targets[command.ino] = target
                    elif result.size <= debugfs.MAX_LINK:
                        cats.append(debugfs.Command("cat", command.ino, result.size))
            elif command.verb == "cat":
                self.targets[command.ino] = where
        return cats

    def entries(self) -> Dict[str, Entry]:
        tree = {}
        for path, ino in self.paths.items():
            inode = self.inodes.get(ino)
            if inode is None:
                continue                 # debugfs could not read the inode: nothing to compare
            target = self.targets.get(ino)
            tree[os.fsdecode(path)] = Entry(kind_of(inode.mode), inode.size, inode.mode, inode.uid, inode.gid,
                                            inode.mtime_ns, inode.ctime_ns,
                                            os.fsdecode(target) if target is not None and
                                            stat.S_ISLNK(inode.mode) else None)
        return tree


def _child_env() -> dict:
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}


def first_line(output: bytes) -> str:
    lines = [line for line in output.decode("utf-8", "replace").splitlines() if line.strip()]
    return cap(escape(lines[0]), 300) if lines else "no message"


def read_trees(base: Path, disk: Path, snapshot_id: str, identity: Optional[Identity],
               progress: Progress = lambda _: None) -> Tuple[Dict[str, Entry], Dict[str, Entry], Reader]:
    """(base tree, snapshot tree, the reader that listed them); both qcow2 files are only read."""
    for path, what in ((base, "base image"), (disk, f"snapshot {snapshot_id}")):
        if not path.is_file():
            raise SnapshotError(f"the disk of {what} is missing: {path}",
                                hint="the directory is incomplete; inspect it by hand", phase=PHASE)
    with tempfile.TemporaryDirectory(prefix="vmloader-diff-") as work:
        reader = Reader(scratch_dir(Path(work), identity), identity, progress)
        base_layer = stage(reader, base, "base.qcow2", "base image")
        snap_layer = stage(reader, disk, "snap.qcow2", f"snapshot {snapshot_id}")
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(reader.check, (snap_layer, base_layer)))
            raws = list(pool.map(lambda job: _open_fs(reader, *job),
                                 (([base_layer], "base.raw", "base"), ([snap_layer, base_layer], "snap.raw",
                                                                      "snapshot"))))
            trees = list(pool.map(reader.list_tree, raws, ("base", "snapshot")))
        return trees[0], trees[1], reader


def scratch_dir(work: Path, identity: Optional[Identity]) -> Path:
    """A directory only the parsers' user can reach: inside our own 0700 mkdtemp, owned by them."""
    scratch = work / "scratch"
    scratch.mkdir(mode=0o700)
    if identity:
        os.chown(scratch, identity.uid, identity.gid)
    return scratch


def stage(reader: Reader, source: Path, name: str, what: str) -> Layer:
    """Where the parsers read `source`: in place when they run as ourselves or anyone may read it
    (a shared cache's base image), else a copy they own that we made (they cannot open our files,
    and we never open a path they could have chosen)."""
    if reader.identity is None or readable_by_anyone(source):
        return Layer(str(source.resolve()), source, what)
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(open(os.open(source, flags), "rb"))
        dst_fd = os.open(reader.scratch / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        dst = stack.enter_context(open(dst_fd, "wb"))
        os.fchown(dst_fd, reader.identity.uid, reader.identity.gid)
        size = os.fstat(src.fileno()).st_size
        copied = 0
        while copied < size:
            sent = os.sendfile(dst.fileno(), src.fileno(), copied, min(size - copied, 1 << 30))
            if sent == 0:
                break
            copied += sent
    return Layer(name, source, what)


def readable_by_anyone(path: Path) -> bool:
    """A regular file that every user may read, in directories every user may enter."""
    real = path.resolve()
    try:
        if not stat.S_ISREG(real.stat().st_mode) or not real.stat().st_mode & stat.S_IROTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in real.parents)
    except OSError:
        return False


def _open_fs(reader: Reader, chain: List[Layer], raw: str, label: str) -> str:
    """The raw file holding the chain's ext file system, its journal replayed."""
    reader.to_raw(chain, raw)
    found = detect(reader.scratch / raw, reader.identity)
    if found in ("mbr", "gpt"):
        raw = reader.extract_partition(raw, chain[0].what)
        found = detect(reader.scratch / raw, reader.identity)
    if found != "ext":
        raise unsupported(found, chain[0].what)
    reader.replay_journal(raw)
    return raw


_MAGIC = ((1080, b"\x53\xef", "ext"), (0, b"XFSB", "XFS"), (65600, b"_BHRfS_M", "Btrfs"),
          (512, b"EFI PART", "gpt"), (510, b"\x55\xaa", "mbr"))


def detect(raw: Path, identity: Optional[Identity]) -> str:
    """What the raw file starts with, by magic numbers only (ext is checked first: an ext file system
    on the whole disk has no partition table, so its 510th bytes are boot code or zeros)."""
    with open_scratch(raw, identity) as file:
        head = file.read(65608)
    for offset, magic, name in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return name
    return "unknown"


def open_scratch(raw: Path, identity: Optional[Identity]):
    """A raw copy the parsers wrote, opened for reading without following links, refused unless it
    is a regular file of theirs (they own the directory and could have swapped it)."""
    fd = os.open(raw, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    file = open(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (identity and st.st_uid != identity.uid):
        file.close()
        raise SnapshotError(f"the scratch copy {raw.name} was replaced", phase=PHASE)
    return file


def unsupported(found: str, what: str) -> SnapshotError:
    name = {"unknown": "no file system vmloader recognises", "mbr": "a partition table with no Linux "
            "partition", "gpt": "a partition table with no Linux partition",
            "XFS": "an XFS file system"}.get(found, f"a {found} file system")
    return SnapshotError(f"the disk of {what} holds {name}; `snapshot diff` reads ext2, ext3 and ext4 (on "
                         "the whole disk or in one Linux partition of an MBR or GPT table) in user space",
                         hint="boot the snapshot and look inside (vmloader snapshot shell), or export it "
                              "(vmloader snapshot export) and inspect it with a tool for that file system",
                         phase=PHASE)


_LINUX_TYPES = {"83", "0fc63daf-8483-4772-8e79-3d69d8477de4",              # Linux data
                "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",                     # x86-64 root
                "b921b045-1df0-41c3-af44-4c6f280d3fae",                     # arm64 root
                "44479540-f297-41b2-9af7-d131d5f0458a"}                     # x86 root


def linux_partition(sfdisk_json: bytes, what: str) -> Tuple[int, int]:
    """(offset, size) in bytes of the largest Linux partition in sfdisk's JSON."""
    try:
        table = json.loads(sfdisk_json)["partitiontable"]
        sector = int(table.get("sectorsize", 512))
        parts = [(int(p["size"]), int(p["start"])) for p in table["partitions"]
                 if str(p.get("type", "")).lower() in _LINUX_TYPES]
    except (ValueError, KeyError, TypeError):
        parts = []
    if not parts:
        raise unsupported("mbr", what)
    size, start = max(parts)
    return start * sector, size * sector

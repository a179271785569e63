"""`vmloader snapshot diff`: what a job changed on its disk, read offline, without booting.

The snapshot's overlay and its base image are opened read-only by one
qemu-storage-daemon. Each gets a throwaway qcow2 layer on top (in a temporary
directory), exported as a raw file through FUSE: the guest was stopped without
unmounting, so its ext4 journal may hold committed changes that must be replayed
(e2fsck -E journal_only) before the tree is right, and the replay writes land in
the throwaway layer. fuse2fs then mounts both views read-only and the two trees
are walked and compared by metadata.

A file counts as changed when its type, size, mode, owner, mtime, link target or
inode ctime differ. Unchanged files are the very same inodes as in the base (the
snapshot is the base plus the blocks the guest wrote), and ctime cannot be set from
userspace, so any write the guest made moves it: no content hashing is needed.
A directory is changed only by its own mode or owner: its mtime, ctime and size
follow from the entries added or removed, which are listed themselves.
Hidden unless asked for (`--all`): what vmloader's own boot writes in every job,
/etc/hostname (the VM's name, by guest-setup) and the agent's __pycache__ under
/usr/lib/vmloader. Nothing else is filtered: /proc, /sys, /dev and /run are mount
points in the guest (empty or static on disk), and a job's files in /tmp are its own.
"""
import contextlib
import json
import os
import signal
import stat
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

from . import proc
from .errors import CommandError, SnapshotError, VMLoaderError
from .snapshots import Snapshot

Progress = Callable[[str], None]
PHASE = "snapshot diff"
_DIR_FIELDS = ("mode", "uid", "gid")
_FIELDS = ("size", "mode", "uid", "gid", "mtime_ns", "target", "ctime_ns")


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


@dataclass(frozen=True)
class Change:
    path: str                       # absolute in the guest: /etc/motd
    kind: str
    size: int                       # in the snapshot (for removed paths: in the base)
    old_size: Optional[int] = None  # changed paths only
    fields: tuple = ()              # changed paths only: what differs (size, mode, mtime_ns, ...)

    def to_dict(self) -> dict:
        data = {"path": self.path, "type": self.kind, "size": self.size}
        if self.old_size is not None:
            data.update(old_size=self.old_size, fields=list(self.fields))
        return data


@dataclass(frozen=True)
class Diff:
    added: tuple = field(default_factory=tuple)
    changed: tuple = field(default_factory=tuple)
    removed: tuple = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {name: [c.to_dict() for c in getattr(self, name)] for name in ("added", "changed", "removed")}

    def lines(self) -> list:
        """`A /work/new`, `C /etc/motd`, `D /etc/issue.net`, sorted by path; directories end in /."""
        tagged = [(c, "A") for c in self.added] + [(c, "C") for c in self.changed] + \
                 [(c, "D") for c in self.removed]
        return [f"{tag} {c.path}{'/' if c.kind == 'dir' and c.path != '/' else ''}"
                for c, tag in sorted(tagged, key=lambda pair: pair[0].path)]


def differences(old: Entry, new: Entry) -> tuple:
    """Names of the fields that differ; () when the path is unchanged."""
    if old.kind != new.kind:
        return ("type",)
    names = _DIR_FIELDS if new.kind == "dir" else _FIELDS
    return tuple(name for name in names if getattr(old, name) != getattr(new, name))


def is_boot_noise(path: str) -> bool:
    """Written by every boot, whatever the job: see the module docstring."""
    return path == "/etc/hostname" or (path.startswith("/usr/lib/vmloader/") and "/__pycache__" in path)


def compare(base: Mapping[str, Entry], snap: Mapping[str, Entry],
            ignore: Callable[[str], bool] = lambda _: False) -> Diff:
    base = {p: e for p, e in base.items() if not ignore(p)}
    snap = {p: e for p, e in snap.items() if not ignore(p)}
    added = tuple(Change(p, snap[p].kind, snap[p].size) for p in sorted(snap.keys() - base.keys()))
    removed = tuple(Change(p, base[p].kind, base[p].size) for p in sorted(base.keys() - snap.keys()))
    changed = []
    for path in sorted(base.keys() & snap.keys()):
        what = differences(base[path], snap[path])
        if what:
            changed.append(Change(path, snap[path].kind, snap[path].size, base[path].size, what))
    return Diff(added, tuple(changed), removed)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "symlink" if stat.S_ISLNK(mode) else "other"


def entry_of(path: str, st: os.stat_result) -> Entry:
    kind = _kind(st.st_mode)
    return Entry(kind, st.st_size, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns,
                 os.readlink(path) if kind == "symlink" else None)


def scan(root: Path, progress: Progress = lambda _: None, label: str = "tree") -> dict:
    """Every path under root (root itself as /), by guest path; stays on root's file system."""
    tree = {"/": entry_of(str(root), os.lstat(root))}
    pending = [(str(root), "")]
    while pending:
        real, guest = pending.pop()
        with os.scandir(real) as entries:
            for item in entries:
                st = item.stat(follow_symlinks=False)
                path = f"{guest}/{item.name}"
                tree[path] = entry_of(item.path, st)
                if stat.S_ISDIR(st.st_mode):
                    pending.append((item.path, path))
                if len(tree) % 5000 == 0:
                    progress(f"scanning {label}: {len(tree)} entries")
    return tree


class Throttled:
    """Pass progress messages on only once `after` seconds have gone by, then at most every `every`."""

    def __init__(self, sink: Progress, after: float = 2.0, every: float = 2.0):
        self.sink, self.after, self.every = sink, after, every
        self.start = time.monotonic()
        self.last = self.start

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if now - self.start >= self.after and now - self.last >= self.every:
            self.last = now
            self.sink(message)


def diff(snapshot: Snapshot, base_present: bool, progress: Progress = lambda _: None,
         everything: bool = False) -> Diff:
    """What the job added, changed and removed against its base; both images are only read."""
    if not base_present:
        raise SnapshotError(f"the base image of snapshot {snapshot.meta.id} ({snapshot.meta.image}) is no "
                            f"longer at {snapshot.meta.base_path} and no repository offers it",
                            hint=f"pull {snapshot.meta.image} again (vmloader images pull) or restore the "
                                 "file; the snapshot alone holds only the blocks the job wrote",
                            phase=PHASE)
    base, disk = Path(snapshot.meta.base_path), snapshot.disk
    base_info, disk_info = _inspect(base, "base image"), _inspect(disk, f"snapshot {snapshot.meta.id}")
    progress = Throttled(progress)
    with tempfile.TemporaryDirectory(prefix="vmloader-diff-") as work, \
            _mounted(Path(work), base, base_info, disk, disk_info) as (base_root, snap_root):
        # both walks at once: each waits mostly on its own fuse2fs, not on this process
        with ThreadPoolExecutor(max_workers=2) as pool:
            trees = pool.map(scan, (base_root, snap_root), (progress, progress), ("base", "snapshot"))
            return compare(*trees, ignore=(lambda _: False) if everything else is_boot_noise)


def _inspect(path: Path, what: str) -> dict:
    """Format and size of a disk image, refusing one qemu-img finds damaged."""
    if not path.is_file():
        raise SnapshotError(f"the disk of {what} is missing: {path}",
                            hint="the directory is incomplete; inspect it by hand", phase=PHASE)
    def damaged(output: bytes) -> SnapshotError:
        first = next(iter(output.decode("utf-8", "replace").strip().splitlines()), "not a disk image")
        return SnapshotError(f"the disk of {what} is damaged ({first}): {path}",
                             hint=f"`qemu-img check {path}` says more; nothing was changed or removed",
                             phase=PHASE)
    try:
        info = json.loads(proc.run(["qemu-img", "info", "--output=json", "-U", str(path)], phase=PHASE).stdout)
        if info["format"] == "qcow2":
            check = proc.run(["qemu-img", "check", "-U", "-f", "qcow2", str(path)], check=False, phase=PHASE)
            if check.returncode not in (0, 3):          # 3: leaked clusters only, harmless for reading
                raise damaged(check.stderr + check.stdout)
    except CommandError as exc:
        raise damaged(exc.stderr.encode()) from None
    except (ValueError, KeyError):
        raise damaged(b"") from None
    return info


@contextlib.contextmanager
def _mounted(work: Path, base: Path, base_info: dict, disk: Path, disk_info: dict) -> Iterator[tuple]:
    """(base_root, snap_root): both disks' file systems, mounted read-only; all undone on exit."""
    with contextlib.ExitStack() as stack:
        try:
            views = _export(stack, work, base, base_info, disk, disk_info)
            roots = []
            for view in views:
                # replays what the guest committed but did not write back; lands in the scratch layer
                proc.run(["e2fsck", "-E", "journal_only", "-p", str(view)], check=False, phase=PHASE)
                roots.append(_fuse2fs(stack, view))
        except SnapshotError:
            raise
        except VMLoaderError as exc:
            raise SnapshotError(f"could not open the disks read-only: {exc.message}",
                                hint="needs root, /dev/fuse, qemu-storage-daemon and fuse2fs "
                                     "(scripts/setup-host.sh installs them)", phase=PHASE) from None
        yield tuple(roots)


def _export(stack: contextlib.ExitStack, work: Path, base: Path, base_info: dict, disk: Path,
            disk_info: dict) -> tuple:
    """One qemu-storage-daemon: base and snapshot read-only, each under a writable scratch layer
    exported as a raw file (FUSE)."""
    argv = ["qemu-storage-daemon",
            "--blockdev", _opts(driver="file", node_name="base-file", filename=base, read_only="on"),
            "--blockdev", _opts(driver=base_info["format"], node_name="base", file="base-file", read_only="on"),
            "--blockdev", _opts(driver="file", node_name="snap-file", filename=disk, read_only="on"),
            "--blockdev", _opts(driver="qcow2", node_name="snap", file="snap-file", backing="base",
                                read_only="on")]
    pidfile = work / "qsd.pid"
    stack.callback(_stop, pidfile)
    views = []
    for name, info in (("base", base_info), ("snap", disk_info)):
        scratch, view = work / f"{name}-scratch.qcow2", work / f"{name}.raw"
        proc.run(["qemu-img", "create", "-q", "-f", "qcow2", str(scratch), str(info["virtual-size"])], phase=PHASE)
        view.touch()
        stack.callback(_unmount, view)      # before the daemon stops: it would leave a dead mount
        argv += ["--blockdev", _opts(driver="file", node_name=f"{name}-scratch-file", filename=scratch),
                 "--blockdev", _opts(driver="qcow2", node_name=f"{name}-scratch", file=f"{name}-scratch-file",
                                     backing=name),
                 "--export", _opts(type="fuse", id=f"{name}-view", node_name=f"{name}-scratch",
                                   mountpoint=view, writable="on")]
        views.append(view)
    proc.run(argv + ["--pidfile", str(pidfile), "--daemonize"], timeout=60, phase=PHASE)
    return tuple(views)


def _opts(**options) -> str:
    """QEMU's key=value,... syntax (node_name= gives node-name=); a comma in a value is doubled."""
    return ",".join(f"{key.replace('_', '-')}={str(value).replace(',', ',,')}" for key, value in options.items())


def _fuse2fs(stack: contextlib.ExitStack, view: Path) -> Path:
    mountpoint = view.with_suffix(".mnt")
    mountpoint.mkdir()
    proc.run(["fuse2fs", "-o", "ro", str(view), str(mountpoint)], timeout=60, phase=PHASE)
    stack.callback(_unmount, mountpoint)
    return mountpoint


def _unmount(mountpoint: Path) -> None:
    """Unmount what we mounted (by its path); lazily if something still holds it."""
    if os.path.ismount(mountpoint):
        try:
            proc.run(["umount", str(mountpoint)], phase=PHASE)
        except VMLoaderError:
            proc.run(["umount", "-l", str(mountpoint)], check=False, phase=PHASE)


def _stop(pidfile: Path, timeout: float = 10.0) -> None:
    """Stop the qemu-storage-daemon we started, by its pid (a daemon: not our child to wait for)."""
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

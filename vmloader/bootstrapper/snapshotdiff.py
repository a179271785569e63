"""`vmloader snapshot diff`: what a job changed on its disk, read offline, without booting.

The snapshot (a qcow2 layer over its image's base) and the base alone are each read
into a scratch raw copy, their ext4 journals replayed there, and both trees listed
with debugfs, all in user space and never with root's privileges (guestdisk.py); the
two trees are then compared by metadata. The snapshot's owner runs it themselves.

A file counts as changed when its type, size, mode, owner, mtime, link target or
inode ctime differ. Unchanged files are the very same inodes as in the base (the
snapshot is the base plus the blocks the guest wrote), and ctime cannot be set from
userspace, so any write the guest made moves it: no content hashing is needed.
A directory is changed only by its own mode or owner: its mtime, ctime and size
follow from the entries added or removed, which are listed themselves.
Hidden unless asked for (`--all`): what vmloader's own boot writes in every job,
/etc/hostname (the VM's name, by guest-setup and the agent), the machine-id the agent
gives each VM (/etc/machine-id, /var/lib/dbus/machine-id), /etc/resolv.conf (guest-setup
names QEMU's DNS there when the job has user networking) and the agent's __pycache__ under
/usr/lib/vmloader. Nothing else is filtered: /proc, /sys, /dev and /run are mount
points in the guest (empty or static on disk), and a job's files in /tmp are its own.
"""
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

from . import guestdisk
from .errors import SnapshotError
from .fstree import Entry
from .guesttext import escape
from .proc import Identity
from .snapshots import Snapshot

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
PHASE = "snapshot diff"
_DIR_FIELDS = ("mode", "uid", "gid")
_FIELDS = ("size", "mode", "uid", "gid", "mtime_ns", "target", "ctime_ns")


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
        """`A /work/new`, `C /etc/motd`, `D /etc/issue.net`, sorted by path; directories end in /.
        A name's control characters and undecodable bytes are escaped (guesttext): one line per path."""
        tagged = [(c, "A") for c in self.added] + [(c, "C") for c in self.changed] + \
                 [(c, "D") for c in self.removed]
        return [f"{tag} {escape(c.path)}{'/' if c.kind == 'dir' and c.path != '/' else ''}"
                for c, tag in sorted(tagged, key=lambda pair: pair[0].path)]


def differences(old: Entry, new: Entry) -> tuple:
    """Names of the fields that differ; () when the path is unchanged."""
    if old.kind != new.kind:
        return ("type",)
    names = _DIR_FIELDS if new.kind == "dir" else _FIELDS
    return tuple(name for name in names if getattr(old, name) != getattr(new, name))


def is_boot_noise(path: str) -> bool:
    """Written by every boot, whatever the job: see the module docstring."""
    return (path in ("/etc/hostname", "/etc/machine-id", "/var/lib/dbus/machine-id", "/etc/resolv.conf")
            or (path.startswith("/usr/lib/vmloader/") and "/__pycache__" in path))


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
         everything: bool = False,
         parsers_as: Callable[[], Optional[Identity]] = guestdisk.parser_identity) -> Diff:
    """What the job added, changed and removed against its base; both images are only read.
    The parsers run as the identity `parsers_as` gives (None: ourselves; by default `nobody` if we are root)."""
    if not base_present:
        raise SnapshotError(f"the base image of snapshot {snapshot.meta.id} ({snapshot.meta.image}) is no "
                            f"longer at {snapshot.meta.base_path} and no repository offers it",
                            hint=f"pull {snapshot.meta.image} again (vmloader images pull) or restore the "
                                 "file; the snapshot alone holds only the blocks the job wrote",
                            phase=PHASE)
    identity = parsers_as()
    started = time.monotonic()
    base, snap, reader = guestdisk.read_trees(Path(snapshot.meta.base_path), snapshot.disk, snapshot.meta.id,
                                              identity, Throttled(progress))
    log.debug("snapshot diff: listed %d + %d entries in %.2f s; parsers ran as uid %s", len(base), len(snap),
              time.monotonic() - started, ",".join(str(uid) for uid in sorted(reader.ran_as)))
    return compare(base, snap, ignore=(lambda _: False) if everything else is_boot_noise)

"""Who may read a job's files on the host: the user the job runs as, and QEMU where libvirt needs it.

A running job's overlay holds whatever the guest wrote; its tails, metadata and
console log what the command printed. Another local user finds the paths in `ps`,
so the paths are no secret: the directories are.

* As any user but root, QEMU runs as that user (qemu:///session): every directory
  vmloader makes for jobs and snapshots is 0700, every file 0600.
* As root, QEMU runs as its own user (`libvirt-qemu` on Debian, qemu:///system).
  libvirt lends it the disk files for the run (dynamic_ownership chowns them and
  gives them back), and virtlogd (root) writes the console log, but QEMU opens the
  disks by path, so it must *search* every directory on the way. Those directories
  are 0710 and group-owned by QEMU's own group: search, no listing, and for nobody
  else, which is why that group must have no member but QEMU's user. Files stay 0600 root.
"""
import grp
import os
import pwd
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .errors import VMLoaderError

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
DEFAULT_QEMU_NAMES = ("libvirt-qemu", "qemu")       # Debian/Ubuntu, then Fedora/RHEL/SUSE
FILE_MODE = 0o600


@dataclass(frozen=True)
class Access:
    """How the directories of jobs and snapshots are made: owner-only, or QEMU's group may search."""
    gid: Optional[int] = None            # QEMU's group (root's jobs); None: owner only
    qemu_user: Optional[str] = None      # QEMU's user, to check it can search the way in

    @property
    def dir_mode(self) -> int:
        return 0o710 if self.gid is not None else 0o700


def current(qemu_conf: Path = QEMU_CONF) -> Access:
    """The arrangement for this process: as root, QEMU's group (checked to hold QEMU alone)."""
    if os.geteuid() != 0:
        return Access()
    user, group = _qemu_identity(qemu_conf)
    if group is None or group.gr_gid == 0:
        return Access(qemu_user=user)      # QEMU runs as root: owner-only is enough
    others = other_members(group, user)
    if others:
        raise VMLoaderError(
            f"QEMU's group {group.gr_name}, which may search job directories, has other members "
            f"({', '.join(others)}): they could read every job's disk and output",
            hint=f"remove them from the group (gpasswd -d USER {group.gr_name}), or set `group` in "
                 f"{qemu_conf} to a group of QEMU's user alone", phase="setup")
    return Access(gid=group.gr_gid, qemu_user=user)


def _qemu_identity(qemu_conf: Path) -> tuple:
    """(user name, group entry) QEMU runs as under qemu:///system, from qemu.conf or the distro default."""
    settings = _read_qemu_conf(qemu_conf)
    user = settings.get("user") or next((n for n in DEFAULT_QEMU_NAMES if _lookup(pwd.getpwnam, n)), None)
    group_name = settings.get("group") or next((n for n in DEFAULT_QEMU_NAMES if _lookup(grp.getgrnam, n)), None)
    if user and user.startswith("+"):
        user = _name_of_uid(int(user[1:]))
    if group_name is None:
        return user, None
    if group_name.startswith("+"):
        return user, _lookup(grp.getgrgid, int(group_name[1:]))
    return user, _lookup(grp.getgrnam, group_name)


def _read_qemu_conf(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError:
        return {}
    return {m.group(1): m.group(2) for m in re.finditer(r'^\s*(user|group)\s*=\s*"([^"]*)"', text, re.M)}


def _lookup(getter, key):
    try:
        return getter(key)
    except (KeyError, OverflowError):
        return None


def _name_of_uid(uid: int) -> Optional[str]:
    entry = _lookup(pwd.getpwuid, uid)
    return entry.pw_name if entry else None


def other_members(group: grp.struct_group, qemu_user: Optional[str]) -> list:
    """Users besides QEMU's who are in `group`, as a supplementary or their primary group."""
    names = set(group.gr_mem) | {p.pw_name for p in pwd.getpwall() if p.pw_gid == group.gr_gid}
    return sorted(names - {qemu_user})


def private_dir(path: Path, access: Access, what: str = "state directory", parents: bool = False) -> Path:
    """Make `path` (and with `parents` its missing parents, as usual), or make an existing one ours and
    private; refuse another's."""
    try:
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise VMLoaderError(f"cannot create the {what} {path}: {exc}",
                            hint="set state_dir in config or VMLOADER_STATE_DIR to a directory of your own",
                            phase="setup") from None
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise VMLoaderError(
            f"the {what} {path} is not a directory of your own (owner uid {info.st_uid}, "
            f"{stat.filemode(info.st_mode)}): job files made in it could be read or replaced by others",
            hint=f"remove or move {path} (or `chown {_name_of_uid(os.geteuid()) or os.geteuid()} {path}` "
                 "if its contents are yours), or set state_dir (VMLOADER_STATE_DIR) to a directory of your own",
            phase="setup")
    _tighten(path, info, access)
    return path


def _tighten(path: Path, info: os.stat_result, access: Access) -> None:
    if access.gid is not None and info.st_gid != access.gid:
        os.chown(path, -1, access.gid)
    if stat.S_IMODE(info.st_mode) != access.dir_mode:
        os.chmod(path, access.dir_mode)
        if stat.S_IMODE(info.st_mode) & ~access.dir_mode & 0o077:
            print(f"vmloader: made {path} private (mode {stat.S_IMODE(info.st_mode):04o} -> "
                  f"{access.dir_mode:04o}): job files are readable only by their owner", file=sys.stderr)


def open_private(path: Path, append: bool = False) -> int:
    """A file only its owner may read, never opened through a symlink; an existing one is narrowed too."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, data: Union[str, bytes]) -> None:
    with open(open_private(path), "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def restrict(path: Path) -> None:
    """Narrow a file someone else made for us (qemu-img's overlay, libvirt's memory state) to 0600."""
    os.chmod(path, FILE_MODE, follow_symlinks=False)


def reclaim(path: Path) -> None:
    """Take back a file libvirt lent QEMU and did not give back (a kept disk after a resumed memory
    snapshot stays QEMU's): owned by us again, 0600."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(info.st_mode) and info.st_uid != os.geteuid() and os.geteuid() == 0:
        os.chown(path, 0, 0, follow_symlinks=False)
    if stat.S_ISREG(info.st_mode):
        os.chmod(path, FILE_MODE, follow_symlinks=False)


def check_traversable(path: Path, access: Access) -> None:
    """As root, every directory above the state dir must let QEMU's user search it."""
    if os.geteuid() != 0 or not access.qemu_user:
        return
    user = _lookup(pwd.getpwnam, access.qemu_user)
    if user is None:
        return
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for parent in path.parents:
        if not _searchable(parent.stat(), user.pw_uid, groups):
            raise VMLoaderError(
                f"QEMU (user {user.pw_name}) cannot reach the job directory {path}: {parent} is not "
                "searchable by it", hint=f"run `chmod o+x {parent}` or set state_dir (VMLOADER_STATE_DIR) "
                                         "elsewhere, e.g. /var/lib/vmloader", phase="setup")


def _searchable(info: os.stat_result, uid: int, groups: set) -> bool:
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid in groups:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)

"""An XFS filesystem image populated from a directory tree without mounting it.

`mkfs.xfs -p PROTOFILE` (xfsprogs 6.1, bookworm's) creates the files a prototype file lists:
per entry its name, a six-character mode (type `-bcdpl`, `u` for setuid, `g` for setgid,
three octal digits), owner, group, and the source file, device numbers or symlink target.
What that syntax cannot say is handled here:

- the sticky bit (/tmp, /var/tmp): set afterwards with `xfs_db -x` (`path`, `write core.mode`);
- hard links: each name becomes its own inode with the same contents, mode and owner (the
  format has no way to name an existing inode); the names are returned so callers can say so;
- `:` at the start of a token begins a comment (ucf's cache has `:etc:default:grub`): such a
  name is written with a placeholder first character, then renamed in place with `xfs_db -x`
  (same length; its directory must be short form, i.e. small, as ucf's is);
- POSIX ACLs (`system.posix_acl_*`, in Debian's tree only /var/log/journal's, which
  systemd-tmpfiles sets again at every boot from `a+` lines) are left out and returned, so
  callers say so;
- tokens are separated by white space and `$` ends a directory: such names, sockets and other
  extended attributes (file capabilities, SELinux labels) are refused, not dropped.

Timestamps are those of the mkfs run. The result is checked with `xfs_repair -n`.
"""
import os
import stat
import subprocess
from pathlib import Path

TYPE = {stat.S_IFREG: "-", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c", stat.S_IFBLK: "b",
        stat.S_IFIFO: "p"}


ACL_PREFIX = "system.posix_acl_"
PLACEHOLDER = "_"          # stands for a name's leading ":" until xfs_db renames it


def _token(text: str, where: Path) -> str:
    if not text or text.startswith(":") or text == "$" or any(c.isspace() for c in text):
        raise ValueError(f"{where}: {text!r} cannot be written in an XFS prototype file")
    return text


def _mode(st: os.stat_result, where: Path) -> str:
    kind = TYPE.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        raise ValueError(f"{where}: a socket cannot be written in an XFS prototype file")
    setuid = "u" if st.st_mode & stat.S_ISUID else "-"
    setgid = "g" if st.st_mode & stat.S_ISGID else "-"
    return f"{kind}{setuid}{setgid}{stat.S_IMODE(st.st_mode) & 0o777:03o} {st.st_uid} {st.st_gid}"


class Prototype:
    """The prototype file's text for a tree, and what mkfs.xfs will not do from it."""

    def __init__(self, root: Path) -> None:
        self.lines = ["vmloader", "0 0"]
        self.sticky = []            # (path inside the filesystem, full st_mode)
        self.hardlinks = {}         # (st_dev, st_ino) -> paths inside the filesystem
        self.renames = []           # (directory inside the filesystem, placeholder name, real name)
        self.acls_left_out = []     # paths inside the filesystem whose POSIX ACLs were not written
        st = os.lstat(root)
        self.lines.append(_mode(st, root))
        self._directory(root, "")
        self.lines.append("$")

    def _directory(self, directory: Path, inside: str) -> None:
        names = sorted(os.listdir(directory))
        for name in names:
            path = directory / name
            st = os.lstat(path)
            here = f"{inside}/{name}"
            xattrs = os.listxattr(path, follow_symlinks=False)
            if any(not x.startswith(ACL_PREFIX) for x in xattrs):
                raise ValueError(f"{path}: extended attributes {xattrs} cannot be written in an XFS prototype file")
            if xattrs:
                self.acls_left_out.append(here)
            written = name
            if name.startswith(":"):
                written = PLACEHOLDER + name[1:]
                if written in names:
                    raise ValueError(f"{path}: its placeholder name {written!r} is taken")
                self.renames.append((inside or "/", written, name))
            entry = f"{_token(written, path)} {_mode(st, path)}"
            if st.st_mode & stat.S_ISVTX:
                self.sticky.append((here, st.st_mode))
            if stat.S_ISDIR(st.st_mode):
                self.lines.append(entry)
                self._directory(path, here)
                self.lines.append("$")
            elif stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    self.hardlinks.setdefault((st.st_dev, st.st_ino), []).append(here)
                self.lines.append(f"{entry} {_token(str(path), path)}")
            elif stat.S_ISLNK(st.st_mode):
                self.lines.append(f"{entry} {_token(os.readlink(path), path)}")
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                self.lines.append(f"{entry} {os.major(st.st_rdev)} {os.minor(st.st_rdev)}")
            else:
                self.lines.append(entry)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _run(args: list) -> str:
    result = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def make(root: Path, image: Path, size: int, uuid: str, label: str) -> Prototype:
    """A `size`-byte XFS filesystem in the file `image` holding the tree `root`."""
    proto = Prototype(root)
    protofile = image.with_suffix(".proto")
    protofile.write_text(proto.text())
    _run(["mkfs.xfs", "-q", "-m", f"uuid={uuid}", "-L", label, "-p", str(protofile),
          "-d", f"file=1,name={image},size={size}"])
    protofile.unlink()
    if proto.sticky:
        fixes = []
        for inside, mode in proto.sticky:
            fixes += ["-c", f"path {inside}", "-c", f"write core.mode 0{mode:o}"]
        _run(["xfs_db", "-x", *fixes, str(image)])
    for directory, written, name in proto.renames:
        _rename(image, directory, written, name)
    _run(["xfs_repair", "-n", "-f", str(image)])
    return proto


def _rename(image: Path, directory: str, written: str, name: str) -> None:
    """Give the entry `written` of a short-form directory its real name (same length)."""
    listing = _run(["xfs_db", "-c", f"path {directory}", "-c", "print u3.sfdir3.list", str(image)])
    for line in listing.splitlines():
        field, _, value = line.partition(" = ")
        if field.endswith(".name") and value == f'"{written}"':
            _run(["xfs_db", "-x", "-c", f"path {directory}", "-c", f'write {field.strip()} "{name}"', str(image)])
            return
    raise RuntimeError(f"{directory}/{written} is not in a short-form directory: cannot rename it to {name}")

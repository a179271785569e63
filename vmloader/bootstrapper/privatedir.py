"""A directory only its owner can enter, held open so that what is made in it is made there.

Forwarded ports of a booted snapshot are Unix sockets in such a directory: the kernel
refuses any other user at the directory (EACCES) before the socket is reached. The
directory is opened once (O_NOFOLLOW, owner and mode checked on the open descriptor)
and every name inside it is used relative to that descriptor, so a path component
renamed or replaced meanwhile cannot redirect a socket or file elsewhere.
"""
import os
import socket
from pathlib import Path

from .errors import UsageError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
SUN_PATH_MAX = 107          # bytes of a Unix socket path, without its NUL


class PrivateDir:
    """`path`, created 0700 if missing; refused unless owned by this user."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = _open_private(self.path)

    def at(self, name: str) -> str:
        """A path naming `name` through the open descriptor (any length, no lookup of the parents)."""
        _check_name(name)
        return f"/proc/self/fd/{self.fd}/{name}"

    def listen(self, name: str, backlog: int = 16) -> socket.socket:
        """A Unix socket bound to `name` (a stale one from a killed boot is replaced), mode 0600."""
        self.unlink(name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.at(name))
            os.chmod(name, 0o600, dir_fd=self.fd)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        return sock

    def write(self, name: str, data: bytes) -> Path:
        """Replace `name` with `data`, 0600, through a fresh temporary file (never through a link)."""
        tmp = f".{name}.{os.getpid()}"
        self.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.fd)
        with open(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        return self.path / name

    def unlink(self, name: str) -> None:
        _check_name(name)
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def close(self, remove: bool = False) -> None:
        """Close the descriptor; with `remove`, also the directory when nothing is left in it."""
        if self.fd < 0:
            return
        if remove:
            try:
                os.rmdir(self.path)
            except OSError:
                pass            # not empty, or already gone: leave it
        os.close(self.fd)
        self.fd = -1


def _open_private(path: Path) -> int:
    parent = os.open(path.parent, _DIR_FLAGS)
    try:
        try:
            os.mkdir(path.name, 0o700, dir_fd=parent)
        except FileExistsError:
            pass
        try:
            fd = os.open(path.name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise UsageError(f"{path} is not a directory of ours: {exc.strerror}",
                             hint=f"remove {path} (a symlink or file is never followed there)") from None
    finally:
        os.close(parent)
    info = os.fstat(fd)
    if info.st_uid != os.geteuid():
        os.close(fd)
        raise UsageError(f"{path} belongs to uid {info.st_uid}, not to you (uid {os.geteuid()})",
                         hint=f"remove {path}; vmloader makes it again, private to you")
    if info.st_mode & 0o077:
        os.fchmod(fd, 0o700)
    return fd


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a plain file name: {name!r}")


def connect_unix(path: Path) -> socket.socket:
    """Connect to a Unix socket at `path` of any length (its directory is opened, then the
    socket reached through the descriptor). OSError as the kernel says it: EACCES for a
    directory of another user, ENOENT, ECONNREFUSED for a socket nobody listens on."""
    path = Path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(str(path))) <= SUN_PATH_MAX:
            sock.connect(str(path))
            return sock
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sock.connect(f"/proc/self/fd/{fd}/{path.name}")
        finally:
            os.close(fd)
    except OSError:
        sock.close()
        raise
    return sock

"""The agent delivery that worked for an image, remembered per image sha256, so later jobs go to it first.

A stock image reaches vmloader's agent one way (delivery.py): cloud-init, the QEMU guest agent,
or an agent baked in. Once a job has seen which, the next job of the same image (the same disk
sha256: a changed image is another image) tries that way alone before probing the others.

Kept per user, in the user's own state dir (`STATE/deliveries/SHA256`, one word), never in the
shared cache: the cache's files are root's, and root's jobs must not act on a file a user could
write, nor a user's on another user's. A record is read only when it is a regular file of the
reading user, in a directory of theirs that nobody else may write, opened without following a
symlink; anything else (or an unknown word) is no record, and the job probes as if new.
"""
import logging
import os
import stat
from pathlib import Path
from typing import Optional

from . import privatefiles
from .cacheindex import check_sha256
from .delivery import BUILTIN, CLOUD_INIT, QEMU_GUEST_AGENT
from .errors import VMLoaderError

KNOWN = (BUILTIN, QEMU_GUEST_AGENT, CLOUD_INIT)
DELIVERIES_DIR = "deliveries"     # under the user's state dir
MAX_RECORD = 64
log = logging.getLogger(__name__)


class DeliveryMemory:
    def __init__(self, directory: Path):
        self.directory = directory

    def _record(self, sha256: str) -> Path:
        return self.directory / check_sha256(sha256)

    def _directory_is_ours(self) -> bool:
        try:
            info = os.lstat(self.directory)
        except OSError:
            return False
        return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
                and not stat.S_IMODE(info.st_mode) & 0o022)

    def recall(self, sha256: str) -> Optional[str]:
        """The delivery remembered for this image, or None (no record, or one we do not trust)."""
        if not self._directory_is_ours():
            return None
        try:
            fd = os.open(self._record(sha256), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except (OSError, VMLoaderError):
            return None
        try:
            info = os.fstat(fd)
            if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid()
                    or stat.S_IMODE(info.st_mode) & 0o022):
                log.debug("ignoring the delivery record %s: not a private file of ours", self._record(sha256))
                return None
            word = os.read(fd, MAX_RECORD).decode("ascii", "replace").strip()
        except OSError:
            return None
        finally:
            os.close(fd)
        return word if word in KNOWN else None

    def remember(self, sha256: str, delivery: str) -> None:
        """Record the way that worked (replaced atomically); a failure to record never fails a job."""
        if delivery not in KNOWN:
            raise ValueError(f"unknown agent delivery {delivery!r}")
        path = self._record(sha256)
        try:
            privatefiles.private_dir(self.directory, privatefiles.Access(), "delivery records directory",
                                     parents=True)
            part = path.with_name(f".{path.name}.{os.getpid()}")
            privatefiles.write_private(part, delivery + "\n")
            os.replace(part, path)
        except (OSError, VMLoaderError) as exc:       # the job itself went fine
            log.debug("could not remember the agent delivery for %s: %s", sha256, exc)

    def forget(self, sha256: str) -> None:
        try:
            self._record(sha256).unlink()
        except (OSError, VMLoaderError):
            pass

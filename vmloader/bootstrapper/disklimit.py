"""A bound on what one job may write: its VM's overlay stops at a stated size.

The guest writes into a qcow2 overlay over the shared base image; the overlay grows
with every new cluster the guest writes, up to the disk's virtual size. A job with a
disk limit (HTCondor's `request_disk`, less what its sandbox takes) is watched while
its VM runs: the overlay's allocated bytes are read ten times a second, and once they pass
the limit the VM is paused (its disk stops changing at once) and the job fails with an
infrastructure error naming the limit, never as a hung or crashed guest.

Polling bounds the overshoot by what the guest writes in one interval (under TCG a few
tens of MiB); the overlay's file size is what the disk holds, so nothing the guest does
can hide its writes from the watch.
"""
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import VMLoaderError

MIB = 2 ** 20
INTERVAL = 0.1


@dataclass(frozen=True)
class DiskLimit:
    """The overlay's bound, and how it came about (for the message)."""
    limit_bytes: int
    origin: str = ""            # e.g. "request_disk 2097152 KiB less the sandbox's 40 KiB"


class DiskLimitExceeded(VMLoaderError):
    """The job wrote more than its disk limit allows: not the guest's crash, not vmloader's bug."""


def allocated(path: Path) -> int:
    """The bytes a file takes on its filesystem (0 when it is gone)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def exceeded(limit: DiskLimit, used: int, phase: Optional[str] = "exec") -> DiskLimitExceeded:
    origin = f" ({limit.origin})" if limit.origin else ""
    return DiskLimitExceeded(
        f"the job reached its disk limit: the VM's disk holds {used // MIB} MiB of changes, more than the "
        f"{limit.limit_bytes // MIB} MiB allowed{origin}; the VM was paused there",
        hint="raise request_disk (e.g. request_disk = 8GB), or have the job write less (or delete "
             "what it no longer needs as it goes)", phase=phase)


class OverlayWatch:
    """Reads `path`'s allocation every `interval` seconds in a thread; past the limit, calls
    `on_breach(used)` once and stops watching. `breach` is then the error to report."""

    def __init__(self, path: Path, limit: DiskLimit, on_breach: Callable[[int], None],
                 interval: float = INTERVAL, usage: Callable[[Path], int] = allocated):
        self.path = path
        self.limit = limit
        self.on_breach = on_breach
        self.interval = interval
        self.usage = usage
        self.breach: Optional[DiskLimitExceeded] = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="overlay-watch", daemon=True)

    def start(self) -> "OverlayWatch":
        self._thread.start()
        return self

    def check(self) -> bool:
        """One look (the thread's, and a last one after the command): True once over the limit."""
        with self._lock:
            if self.breach is not None:
                return True
            used = self.usage(self.path)
            if used <= self.limit.limit_bytes:
                return False
            self.breach = exceeded(self.limit, used)
            self.on_breach(used)
            return True

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            if self.check():
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(60)           # a check stuck in a libvirt call must not hold the teardown

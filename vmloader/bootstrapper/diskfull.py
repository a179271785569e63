"""A full host filesystem, said as such instead of as a hung guest or a vmloader bug.

QEMU's default for a failed disk write (libvirt error_policy unset: werror=enospc)
is to pause the VM, not to fail the guest's write: the agent's heartbeats stop
and the job would be reported as a hung guest. When the agent falls silent we
ask libvirt why the VM is paused; an I/O-error pause means the filesystem under
the job's overlay is full (or failing), and the message names it.
"""
import errno
import shutil
import sys
from pathlib import Path
from typing import Optional

from .errors import VMLoaderError

FIX = "free space there, or point state_dir (VMLOADER_STATE_DIR) at a larger filesystem"


def _free_bytes(path: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def io_pause_note(machine, overlay: Path) -> Optional[str]:
    """What to add to the error when the VM stopped because its disk could not be written
    (`machine`: a virt.Machine, or None before one started)."""
    if machine is None or not machine.paused_on_io_error():
        return None
    free = _free_bytes(overlay.parent)
    where = f"the filesystem holding {overlay.parent} ({free} bytes free)"
    if free is not None and free < 64 * 2 ** 20:
        return f"; QEMU paused the VM on a disk write error: {where} is full; {FIX}"
    return f"; QEMU paused the VM on a disk write error writing {overlay} ({where}); check that filesystem"


def host_write_error(exc: OSError, phase: Optional[str], job_dir: Path) -> VMLoaderError:
    """vmloader itself could not write a job file (its output, its record): never a bug report."""
    if exc.errno == errno.ENOSPC:
        return VMLoaderError(f"the filesystem holding {job_dir} is full: {exc}", hint=FIX, phase=phase)
    return VMLoaderError(f"cannot write in the job directory {job_dir}: {exc}",
                         hint=f"check {job_dir} and its filesystem", phase=phase)


def best_effort(what: str, write, *args) -> None:
    """A job-record write that must not turn a full disk into a crash of the teardown."""
    try:
        write(*args)
    except OSError as exc:
        print(f"vmloader: could not write {what}: {exc}", file=sys.stderr)

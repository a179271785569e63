"""The one place that opens libvirt connections and translates libvirt errors, and the
machine interface the job runner drives VMs through."""
import os
import select
import signal
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Optional, Protocol, TypeVar

import libvirt

from .errors import LibvirtError

T = TypeVar("T")

_START_HINTS = {
    "qemu:///system": "start the daemons as root: `virtlogd -d; libvirtd -d` (make demo does this)",
    "qemu:///session": "install libvirt-daemon (libvirtd starts per user on demand) and check $XDG_RUNTIME_DIR",
}


def silence_libvirt_errors() -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def default_uri(hypervisor: str, euid: int) -> str:
    if hypervisor == "xen":
        return "xen:///system"
    return "qemu:///system" if euid == 0 else "qemu:///session"


def connect(uri: str) -> "libvirt.virConnect":
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        hint = _START_HINTS.get(uri.split("?")[0].replace("+unix", ""),
                                "check that libvirtd is running and the URI is right")
        raise LibvirtError(f"cannot connect to libvirt at {uri}: {exc.get_error_message()}",
                           hint=hint, phase="define") from None


_CODE_MESSAGES = {
    libvirt.VIR_ERR_NO_DOMAIN: "the VM no longer exists",
    libvirt.VIR_ERR_XML_ERROR: "libvirt rejected the generated domain XML",
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED: "this host's libvirt/QEMU does not support the requested configuration",
    libvirt.VIR_ERR_OPERATION_FAILED: "libvirt could not complete the operation",
    libvirt.VIR_ERR_SYSTEM_ERROR: "a system call failed inside libvirt",
}


def translate(err: "libvirt.libvirtError", phase: str) -> LibvirtError:
    what = _CODE_MESSAGES.get(err.get_error_code(), "libvirt failed")
    return LibvirtError(f"{what}: {err.get_error_message()}",
                        hint="run with --debug and see libvirtd's log; `vmloader hypervisors` shows what is usable",
                        phase=phase)


# -- the machine interface --------------------------------------------------------
# The job runner sees a hypervisor connection (`Machines`) that brings a VM to life and
# the VM itself (`Machine`); `LibvirtMachines` is the real one, tests pass a fake.
class Machine(Protocol):
    """One running VM."""
    name: str

    def is_active(self) -> bool:
        """Whether the VM runs; False when it is gone or libvirt cannot tell."""

    def paused_on_io_error(self) -> bool:
        """Whether QEMU paused the VM because a disk write failed (a full host filesystem)."""

    def pause(self) -> None:
        """Freeze the VM's vCPUs where they are (its disk stops changing); never raises."""

    def resume(self) -> None:
        """Let a VM started paused run; LibvirtError if it cannot."""

    def qemu_pid(self) -> Optional[int]:
        """The pid of the VM's QEMU process, or None when it cannot be told for certain."""

    def save(self, path: Path) -> None:
        """Stop the VM by writing its memory to `path`; LibvirtError if that failed."""

    def destroy(self) -> None:
        """Stop the VM at once; never raises (says on stderr how to do it by hand if it cannot)."""

    def kill(self) -> None:
        """Stop a VM nothing is kept of: its QEMU has exited when this returns, while libvirt's own
        bookkeeping of it (which waits until the process is reaped) goes on without us. Falls back
        to `destroy`; never raises."""


class Machines(Protocol):
    """One connection to a hypervisor."""

    def create(self, xml: str, paused: bool = False) -> Machine:
        """Define and start a transient VM from validated domain XML (its vCPUs stopped with
        `paused`); LibvirtError if refused."""

    def saved_xml(self, state: Path) -> str:
        """The domain XML kept in a memory state file."""

    def restore(self, state: Path, xml: str, name: str, paused: bool = False) -> Machine:
        """Start a VM from its saved memory, running (or stopped with `paused`), with `xml` for
        its host-side files."""

    def host_identity(self) -> dict:
        """What a saved state depends on besides the guest: libvirt's and the hypervisor's versions, URI."""

    def close(self) -> None:
        """Let go of the connection (never raises)."""


Connect = Callable[[str], Machines]

KILL_WAIT = 5.0           # seconds a killed QEMU has to exit before `kill` falls back to libvirt's destroy
NAME_WAIT = 30.0          # seconds a VM name stays taken by one just killed (libvirt finishing with it)
# Seconds a save or restore of a VM's memory may take. A 1 GiB guest's state (about 180 MB) takes
# seconds here; a QEMU that stops moving it would otherwise hold the job for ever.
MEMORY_STATE_LIMIT = 900.0

# Where a libvirt daemon keeps its QEMU pid files (only the system daemon's matter: it alone
# starts QEMU outside the caller's process tree, see qemucgroup.py).
_QEMU_RUN_DIRS = {"qemu:///system": Path("/run/libvirt/qemu")}


class LibvirtMachine:
    def __init__(self, domain: "libvirt.virDomain", name: str, uri: str):
        self.domain = domain
        self.name = name
        self.uri = uri

    def is_active(self) -> bool:
        try:
            return bool(self.domain.isActive())
        except libvirt.libvirtError:
            return False

    def paused_on_io_error(self) -> bool:
        try:
            state, reason = self.domain.state()
        except libvirt.libvirtError:
            return False
        return state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR

    def pause(self) -> None:
        try:
            self.domain.suspend()
        except libvirt.libvirtError:
            pass                         # gone already: nothing writes any more

    def resume(self) -> None:
        try:
            self.domain.resume()
        except libvirt.libvirtError as exc:
            raise translate(exc, "define") from None

    def qemu_pid(self) -> Optional[int]:
        """From the pid file the system libvirtd keeps (root's only), checked against the process's
        own command line (`-name guest=NAME,...`): a stale file must never name another process."""
        run_dir = _QEMU_RUN_DIRS.get(self.uri.split("?")[0].replace("+unix", ""))
        if run_dir is None:
            return None
        try:
            text = (run_dir / f"{self.name}.pid").read_text().strip()
            if not text.isdigit():
                return None
            args = Path(f"/proc/{text}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        marker = f"guest={self.name},".encode()
        return int(text) if any(arg.startswith(marker) for arg in args) else None

    def save(self, path: Path) -> None:
        try:
            finished = within(MEMORY_STATE_LIMIT, lambda: self.domain.save(str(path)))
        except libvirt.libvirtError as exc:
            raise LibvirtError(exc.get_error_message() or "libvirt failed", phase="teardown") from None
        if not finished:
            self.kill()                     # QEMU ended: libvirt's save fails and its call returns
            raise LibvirtError(f"saving VM {self.name}'s memory did not finish within {MEMORY_STATE_LIMIT:.0f} s; "
                               "the VM was ended", hint="see libvirtd's log and the disk the state goes to",
                               phase="teardown")

    def destroy(self) -> None:
        try:
            if self.domain.isActive():
                self.domain.destroy()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                self._destroy_reconnecting()      # e.g. libvirtd restarted during the job

    def kill(self) -> None:
        """SIGKILL to QEMU itself, then wait for it to exit (seconds sooner than libvirt's destroy:
        that also waits until the exited process is reaped, which this host's init may take its time
        over; libvirt notices the exit on its own and forgets the VM). Signalled through a pidfd taken
        before the pid is checked again, so no other process that took the pid meanwhile is hit.
        Without a certain pid (or pidfds): destroy."""
        pid = self.qemu_pid()
        try:
            fd = os.pidfd_open(pid) if pid is not None else -1
        except OSError:
            fd = -1
        if fd < 0:
            self.destroy()
            return
        try:
            exited = False
            if self.qemu_pid() == pid:               # (still our QEMU now that the pidfd holds it)
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                exited = wait_exited(fd, KILL_WAIT)
        except OSError:
            exited = False
        finally:
            os.close(fd)
        if not exited:
            self.destroy()

    def _destroy_reconnecting(self) -> None:
        """Our connection died with libvirtd; the VM may not have: find it by name on a new one."""
        deadline = time.monotonic() + 30                 # libvirtd may be starting up again
        while True:
            try:
                conn = libvirt.open(self.uri)
                break
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    print(f"vmloader: cannot reach libvirt at {self.uri} to destroy VM {self.name}; "
                          f"do it with `virsh -c {self.uri} destroy {self.name}`", file=sys.stderr)
                    return
                time.sleep(1)
        try:
            domain = conn.lookupByName(self.name)
            if domain.isActive():
                domain.destroy()
        except libvirt.libvirtError:
            pass                                         # gone already
        finally:
            conn.close()


def within(seconds: float, call: Callable[[], object]) -> bool:
    """Run a libvirt call that waits on QEMU (a save, a restore) for at most `seconds`: True when it
    returned, False while it still runs (it goes on in its thread until the caller ends the VM). What
    it raised is raised here. What a stop signal raises meanwhile (a job removed mid-save) waits
    until then, as when the call ran in the caller's thread: the state is saved whole first."""
    raised: list = []
    began, finished = threading.Event(), threading.Event()

    def target() -> None:
        began.set()
        try:
            call()
        except BaseException as exc:       # handed to the caller's thread
            raised.append(exc)
        finally:
            finished.set()
    deadline = time.monotonic() + seconds
    try:
        threading.Thread(target=target, name="libvirt-call", daemon=True).start()
        finished.wait(seconds)
    except BaseException:
        if began.wait(5):                   # (else the signal came before the thread did)
            finished.wait(max(deadline - time.monotonic(), 0))
        raise
    if not finished.is_set():
        return False
    if raised:
        raise raised[0]
    return True


def wait_exited(pidfd: int, seconds: float) -> bool:
    """Whether the process of `pidfd` exited within `seconds` (a zombie counts: it is the reaping,
    by this host's init, that can take a while)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(int(seconds * 1000)))


def while_name_removed(call: Callable[[], T]) -> T:
    """`call` (a libvirt call making a VM of a name), again while libvirt still removes an ended VM
    of that name, up to NAME_WAIT seconds. libvirt's lookups no longer see a VM it is removing (so
    `_wait_name_free` finds the name free), but it refuses a new one of that name until it is gone
    ("domain '...' is already being removed"): a lane's next job, restored at once after the last
    one's VM was killed, met that on a busy host and took the warm state for unusable."""
    deadline = time.monotonic() + NAME_WAIT
    while True:
        try:
            return call()
        except libvirt.libvirtError as exc:
            if "is already being removed" not in (exc.get_error_message() or str(exc)) \
                    or time.monotonic() >= deadline:
                raise
        time.sleep(0.02)


class LibvirtMachines:
    """The real hypervisor connection (libvirt + QEMU or Xen)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.conn = connect(uri)

    def _wait_name_free(self, name: str) -> None:
        """A VM just killed (`LibvirtMachine.kill`) keeps its name in libvirt a moment longer (until
        its QEMU is reaped): a lane's next restore or build waits for that, up to NAME_WAIT seconds
        (after that libvirt's own error says the name is taken)."""
        if _QEMU_RUN_DIRS.get(self.uri.split("?")[0].replace("+unix", "")) is None:
            return                           # (only killed where the pid is known: the system daemon's)
        deadline = time.monotonic() + NAME_WAIT
        while time.monotonic() < deadline:
            try:
                domain = self.conn.lookupByName(name)
            except libvirt.libvirtError:
                return                       # no such VM (or libvirt cannot tell: its call says)
            if LibvirtMachine(domain, name, self.uri).qemu_pid() is not None:
                return                       # a live VM of that name: not one ending (libvirt refuses)
            time.sleep(0.02)

    def create(self, xml: str, paused: bool = False) -> LibvirtMachine:
        flags = libvirt.VIR_DOMAIN_START_VALIDATE | (libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)
        name = ET.fromstring(xml).findtext("name")
        if name:
            self._wait_name_free(name)
        try:
            domain = while_name_removed(lambda: self.conn.createXML(xml, flags))
        except libvirt.libvirtError as exc:
            raise translate(exc, "define") from None
        return LibvirtMachine(domain, domain.name(), self.uri)

    def saved_xml(self, state: Path) -> str:
        try:
            return self.conn.saveImageGetXMLDesc(str(state), 0)
        except libvirt.libvirtError as exc:
            raise translate(exc, "define") from None

    def restore(self, state: Path, xml: str, name: str, paused: bool = False) -> LibvirtMachine:
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
        self._wait_name_free(name)
        try:
            finished = within(MEMORY_STATE_LIMIT,
                              lambda: while_name_removed(lambda: self.conn.restoreFlags(str(state), xml, flags)))
            machine = LibvirtMachine(self.conn.lookupByName(name), name, self.uri)
        except libvirt.libvirtError as exc:
            raise translate(exc, "define") from None
        if not finished:
            machine.kill()                  # QEMU ended: libvirt's restore fails and its call returns
            raise LibvirtError(f"restoring VM {name} from {state} did not finish within "
                               f"{MEMORY_STATE_LIMIT:.0f} s; the VM was ended",
                               hint="see libvirtd's log; the state file may be damaged", phase="define")
        return machine

    def host_identity(self) -> dict:
        try:
            return {"libvirt": self.conn.getLibVersion(), "hypervisor": self.conn.getVersion(), "uri": self.uri}
        except libvirt.libvirtError as exc:
            raise translate(exc, "define") from None

    def close(self) -> None:
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass

"""virt.py's parts that need no libvirt daemon: telling that a killed QEMU has exited, and bounding
the calls that wait on QEMU moving a VM's memory, trying again a name libvirt still removes."""
import os
import signal
import subprocess
import threading
import time

import libvirt
import pytest

from vmloader.bootstrapper import virt
from vmloader.bootstrapper.errors import LibvirtError


def test_a_killed_process_counts_as_exited_while_still_a_zombie():
    child = subprocess.Popen(["sleep", "60"])
    fd = os.pidfd_open(child.pid)
    try:
        assert not virt.wait_exited(fd, 0.2)                  # alive: not exited within the time given
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        assert virt.wait_exited(fd, 30)                       # exited, not reaped yet (a zombie)
        with open(f"/proc/{child.pid}/stat") as handle:
            assert handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    finally:
        os.close(fd)
        child.kill()
        child.wait()


class StuckDomain:
    """A libvirt domain whose QEMU stopped moving its memory: save() returns (failing) only once the
    VM is destroyed."""

    def __init__(self):
        self.ended = threading.Event()

    def save(self, path):
        self.ended.wait(60)
        raise virt.libvirt.libvirtError("operation failed: domain is not running")

    def isActive(self):
        return not self.ended.is_set()

    def destroy(self):
        self.ended.set()


def test_a_memory_save_that_never_finishes_ends_the_vm_and_fails_naming_the_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(virt, "MEMORY_STATE_LIMIT", 0.5)
    domain = StuckDomain()
    machine = virt.LibvirtMachine(domain, "vmloader-stuck", "test:///default")
    started = time.monotonic()
    with pytest.raises(LibvirtError, match="vmloader-stuck's memory did not finish within 0 s; the VM was ended"):
        machine.save(tmp_path / "state")
    assert domain.ended.is_set() and time.monotonic() - started < 10


def test_a_call_within_its_limit_returns_and_its_error_reaches_the_caller():
    assert virt.within(5, lambda: None) is True
    with pytest.raises(ZeroDivisionError):
        virt.within(5, lambda: 1 / 0)


class Stopped(Exception):
    """What vmloader's SIGTERM/SIGINT/SIGHUP handler raises (cli.Interrupted)."""


def test_a_stop_signal_during_a_memory_save_surfaces_once_the_save_returned():
    """As when libvirt's save ran in the main thread: a job stopped mid-save keeps its whole state."""
    order = []

    def save():                                               # stopped while it runs
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.5)
        order.append("save returned")

    def stop(*_):
        order.append("stop")
        raise Stopped()
    previous = signal.signal(signal.SIGHUP, stop)
    try:
        with pytest.raises(Stopped):
            virt.within(30, save)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert "save returned" in order                           # when the stop surfaced, the save had returned


class NameStillRemoved:
    """A libvirt that refuses a new VM of a name while it removes an ended one, `times` times."""
    def __init__(self, times: int, message: str = "Requested operation is not valid: domain 'vmloader-warm-x-0' "
                                                    "is already being removed"):
        self.times, self.message, self.calls = times, message, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.times:
            raise libvirt.libvirtError(self.message)
        return "domain"


def test_a_vm_name_libvirt_still_removes_is_tried_again_until_it_is_free():
    call = NameStillRemoved(3)
    assert virt.while_name_removed(call) == "domain" and call.calls == 4


def test_a_name_removed_for_longer_than_the_wait_gives_libvirts_error(monkeypatch):
    monkeypatch.setattr(virt, "NAME_WAIT", 0.1)
    call = NameStillRemoved(10 ** 6)
    with pytest.raises(libvirt.libvirtError, match="already being removed"):
        virt.while_name_removed(call)
    assert 2 <= call.calls < 10 ** 6


def test_other_libvirt_errors_are_not_tried_again():
    call = NameStillRemoved(1, "operation failed: domain 'vmloader-warm-x-0' already exists with uuid 1234")
    with pytest.raises(libvirt.libvirtError, match="already exists"):
        virt.while_name_removed(call)
    assert call.calls == 1

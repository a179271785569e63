"""virt.py's parts that need no libvirt: telling that a killed QEMU has exited."""
import os
import signal
import subprocess

from vmloader.bootstrapper import virt


def test_a_killed_process_counts_as_exited_while_still_a_zombie():
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert not virt.wait_exited(child.pid, 0.2)           # alive: not exited within the time given
        os.kill(child.pid, signal.SIGKILL)
        assert virt.wait_exited(child.pid, 30)                # exited, not reaped yet (a zombie)
        with open(f"/proc/{child.pid}/stat") as handle:
            assert handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    finally:
        child.kill()
        child.wait()
    assert virt.wait_exited(child.pid, 0)                      # gone entirely

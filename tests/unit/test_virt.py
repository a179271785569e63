"""virt.py's parts that need no libvirt: telling that a killed QEMU has exited."""
import os
import signal
import subprocess

from vmloader.bootstrapper import virt


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

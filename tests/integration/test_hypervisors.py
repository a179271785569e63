"""Hypervisor detection on this machine, through the real libvirtd.

Among the VM tests, not the unit tests: those run beside the test that restarts libvirtd
(`make test`), and a probe landing in that restart found no libvirtd socket.
"""
import pytest

from vmloader.bootstrapper import hypervisors

pytestmark = pytest.mark.integration


def test_this_pvm_machine_is_probed_for_real():
    found = {h.name: h for h in hypervisors.detect(hypervisors.HostProbes())}
    assert found["qemu"].usable, found["qemu"].reason
    if hypervisors.HostProbes().kvm_modules() == {"kvm_pvm"}:
        assert not found["kvm"].usable and "kvm_pvm" in found["kvm"].reason

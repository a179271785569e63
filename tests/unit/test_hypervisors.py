import pytest

from vmloader.bootstrapper import hypervisors
from vmloader.bootstrapper.errors import HypervisorError


class FakeProbes:
    """Stands in for HostProbes: each field is what the real probe would have found."""

    def __init__(self, *, types=("kvm", "qemu"), device=True, modules=("kvm_intel",), flags=("vmx",),
                 xen=False, boots=(True, "a standard guest kernel booted under KVM in 1.0 s"), euid=0):
        self.types, self.device, self.modules, self.flags = types, device, set(modules), set(flags)
        self.xen, self.boots, self.euid = xen, boots, euid
        self.booted = False

    def libvirt_domain_types(self, uri):
        return tuple(self.types), "" if self.types else "cannot connect"

    def kvm_device(self):
        return self.device

    def kvm_modules(self):
        return self.modules

    def cpu_virt_flags(self):
        return self.flags

    def xen_present(self):
        return self.xen

    def kvm_boots_a_kernel(self):
        self.booted = True
        return self.boots


def by_name(found):
    return {h.name: h for h in found}


def test_a_pvm_host_reports_kvm_unusable_with_the_reason_and_picks_qemu():
    probes = FakeProbes(modules=("kvm_pvm",), flags=())
    found = hypervisors.detect(probes)
    assert [h.name for h in found] == ["kvm", "qemu", "xen"]
    kvm = by_name(found)["kvm"]
    assert not kvm.usable and "kvm_pvm" in kvm.reason and "hang" in kvm.reason
    assert hypervisors.choose(found).name == "qemu"


def test_a_real_kvm_host_is_test_booted_and_then_chosen():
    probes = FakeProbes()
    found = hypervisors.detect(probes)
    assert probes.booted
    assert hypervisors.choose(found).name == "kvm"
    assert by_name(found)["kvm"].uri == "qemu:///system"


def test_kvm_that_cannot_boot_a_kernel_is_unusable_with_the_probes_words():
    probes = FakeProbes(boots=(False, "a standard guest kernel did not finish booting under KVM within 30 s"))
    kvm = by_name(hypervisors.detect(probes))["kvm"]
    assert not kvm.usable and "did not finish booting" in kvm.reason


def test_no_cpu_virtualization_flags_means_no_kvm():
    kvm = by_name(hypervisors.detect(FakeProbes(flags=())))["kvm"]
    assert not kvm.usable and "vmx/svm" in kvm.reason


def test_an_unprivileged_user_gets_the_session_uri():
    assert by_name(hypervisors.detect(FakeProbes(euid=1000)))["qemu"].uri == "qemu:///session"


def test_forcing_an_unusable_hypervisor_names_its_reason_and_the_usable_ones():
    found = hypervisors.detect(FakeProbes(modules=("kvm_pvm",), flags=()))
    with pytest.raises(HypervisorError) as info:
        hypervisors.choose(found, "kvm")
    assert "kvm_pvm" in info.value.message
    assert "qemu" in info.value.hint


def test_nothing_usable_is_an_error_with_a_hint():
    found = hypervisors.detect(FakeProbes(types=(), device=False))
    with pytest.raises(HypervisorError) as info:
        hypervisors.choose(found)
    assert "no usable hypervisor" in info.value.message and info.value.hint


def test_xen_is_used_when_forced_on_a_dom0():
    found = hypervisors.detect(FakeProbes(xen=True))
    xen = hypervisors.choose(found, "xen")
    assert xen.domain_type == "xen" and xen.uri == "xen:///system"

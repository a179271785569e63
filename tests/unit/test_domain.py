import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import replace

import libvirt
import pytest

from vmloader.bootstrapper.errors import SnapshotError
from vmloader.bootstrapper.domain import (BootSpec, ChannelSpec, ConsoleSpec, DiskSpec, DomainSpec,
                                          JobMetadata, NetworkSpec, domain_xml, read_job_metadata)

META = JobMetadata("20261122-120000-abc123", "alice", "debian-12@12.1", "a" * 64, 4242)


DIRECT = BootSpec("/cache/artifacts/kernel", "/cache/artifacts/initrd",
                  "root=/dev/vda rw console=ttyS0 init=/sbin/vmloader-init")
FIRMWARE = BootSpec(None, None)


def spec(hypervisor="qemu", network="user", boot=DIRECT) -> DomainSpec:
    return DomainSpec(
        name="vmloader-20261122-120000-abc123", hypervisor=hypervisor, memory_mib=1024, vcpus=2,
        boot=boot,
        disks=(DiskSpec("/jobs/j/overlay.qcow2", backing="/cache/artifacts/base"),),
        channel=ChannelSpec("/jobs/j/agent.sock"), console=ConsoleSpec("/jobs/j/console.log"),
        network=NetworkSpec(network), metadata=META, uuid="6d4fe2c6-3a9c-4d3b-9a55-0c7a8f0f0001")


VARIANTS = [("qemu-user-net.xml", "qemu", "user", DIRECT), ("kvm-no-net.xml", "kvm", "none", DIRECT),
            ("xen.xml", "xen", "user", DIRECT), ("qemu-firmware-boot.xml", "qemu", "user", FIRMWARE),
            ("xen-pygrub.xml", "xen", "user", FIRMWARE)]


@pytest.mark.parametrize("name, hypervisor, network, boot", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_domain_xml_matches_the_golden_file(golden, name, hypervisor, network, boot):
    golden(name, domain_xml(spec(hypervisor, network, boot)))


@pytest.mark.skipif(shutil.which("virt-xml-validate") is None, reason="virt-xml-validate (libvirt-clients) missing")
@pytest.mark.parametrize("name, hypervisor, network, boot", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_generated_xml_validates_against_libvirts_schema(tmp_path, name, hypervisor, network, boot):
    path = tmp_path / "domain.xml"
    path.write_text(domain_xml(spec(hypervisor, network, boot)))
    result = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_base_image_is_never_relabelled_and_acpi_is_on():
    root = ET.fromstring(domain_xml(spec()))
    seclabel = root.find("devices/disk/backingStore/source/seclabel")
    assert seclabel.get("relabel") == "no"
    assert root.find("features/acpi") is not None
    assert root.findtext("on_crash") == "destroy"


def test_firmware_boot_boots_the_disk_instead_of_a_kernel():
    root = ET.fromstring(domain_xml(spec(boot=FIRMWARE)))
    assert root.find("os/boot").get("dev") == "hd" and root.find("os/kernel") is None


def test_no_network_means_no_interface_at_all():
    assert ET.fromstring(domain_xml(spec(network="none"))).find("devices/interface") is None


def test_job_metadata_reads_back_from_the_xml():
    assert read_job_metadata(domain_xml(spec())) == META
    assert read_job_metadata("<domain type='qemu'><name>other</name></domain>") is None


def test_strings_with_xml_metacharacters_are_escaped_not_pasted():
    odd = JobMetadata("id", "<evil>&'\"", "img", "b" * 64, 1)
    xml = domain_xml(DomainSpec("n", "qemu", 64, 1, BootSpec("k", "i", "a=<b>"), (DiskSpec("/d"),),
                                ChannelSpec("/s"), ConsoleSpec("/c"), metadata=odd))
    assert read_job_metadata(xml).user == "<evil>&'\""
    assert ET.fromstring(xml).findtext("os/cmdline") == "a=<b>"


def test_lifecycle_on_libvirts_test_driver(tmp_path):
    """define, start, read our metadata back, destroy, undefine: on a private test:/// driver.

    The test driver only runs domains of type 'test', so the test rewrites the
    root element's type; everything below it is exactly what we generate.
    """
    node = tmp_path / "node.xml"
    node.write_text("<node><cpu><mhz>2000</mhz><model>x86</model><active>2</active></cpu>"
                    "<memory>4194304</memory></node>")
    conn = libvirt.open(f"test://{node}")
    root = ET.fromstring(domain_xml(spec()))
    root.set("type", "test")
    domain = conn.defineXML(ET.tostring(root, encoding="unicode"))
    domain.create()
    assert domain.isActive()
    assert read_job_metadata(domain.XMLDesc()) == META
    domain.destroy()
    domain.undefine()
    assert conn.listAllDomains() == []
    conn.close()


def test_a_saved_domain_is_retargeted_at_new_files_keeping_its_hardware():
    from vmloader.bootstrapper.domain import retarget_saved_xml
    attach = (ChannelSpec("/jobs/j/attach-1.sock", name="org.vmloader.agent.1"),)
    saved = ET.fromstring(domain_xml(replace(spec(), attach_channels=attach)))
    address = saved.find("devices/disk/address")        # as libvirt's saved XML may have moved it
    address.set("slot", "0x07")
    new = replace(spec(), name="vmloader-20261122-120000-abc123", uuid=None,
                  disks=(DiskSpec("/jobs/k/overlay.qcow2", backing="/cache/artifacts/base",
                                  middle=("/snapshots/j/disk.qcow2",)),),
                  channel=ChannelSpec("/jobs/k/agent.sock"), console=ConsoleSpec("/jobs/k/console.log"),
                  attach_channels=(ChannelSpec("/jobs/k/attach-1.sock", name="org.vmloader.agent.1"),),
                  metadata=JobMetadata("k", "alice", "debian-12@12.1", "a" * 64, 99))
    out = ET.fromstring(retarget_saved_xml(ET.tostring(saved, encoding="unicode"), new))
    assert out.findtext("uuid") == "6d4fe2c6-3a9c-4d3b-9a55-0c7a8f0f0001"      # libvirt insists
    disk = out.find("devices/disk")
    assert disk.find("source").get("file") == "/jobs/k/overlay.qcow2"
    chain = [e.get("file") for e in disk.iter("source")]
    assert chain == ["/jobs/k/overlay.qcow2", "/snapshots/j/disk.qcow2", "/cache/artifacts/base"]
    assert disk.find("address").attrib == address.attrib
    assert {c.find("target").get("name"): c.find("source").get("path") for c in out.iter("channel")} == {
        "org.vmloader.agent.0": "/jobs/k/agent.sock", "org.vmloader.agent.1": "/jobs/k/attach-1.sock"}
    assert out.find("devices/serial/log").get("file") == "/jobs/k/console.log"
    assert read_job_metadata(ET.tostring(out, encoding="unicode")).owner_pid == 99
    assert out.findtext("memory") == saved.findtext("memory") and out.findtext("vcpu") == saved.findtext("vcpu")


def test_a_saved_stock_domain_gets_the_new_jobs_seed_and_variable_store_too():
    """A stock image's timed-out job saved with its memory: its cloud-init seed (vdb) and UEFI
    variable store lived in that job's directory, so the resumed VM must use the new job's."""
    from vmloader.bootstrapper.domain import BootSpec, retarget_saved_xml

    def stock(job: str) -> DomainSpec:
        return replace(spec(), disks=(DiskSpec(f"/jobs/{job}/overlay.qcow2", backing="/cache/artifacts/base"),
                                      DiskSpec(f"/jobs/{job}/cidata.img", target="vdb", fmt="raw", readonly=True)),
                       boot=BootSpec(None, None, firmware="uefi", loader="/usr/share/OVMF/OVMF_CODE_4M.fd",
                                     nvram=f"/jobs/{job}/OVMF_VARS.fd"))
    out = ET.fromstring(retarget_saved_xml(domain_xml(stock("j")), stock("k")))
    sources = {d.find("target").get("dev"): d.find("source").get("file") for d in out.iter("disk")}
    assert sources == {"vda": "/jobs/k/overlay.qcow2", "vdb": "/jobs/k/cidata.img"}
    assert out.find("devices/disk[2]/readonly") is not None
    assert out.findtext("os/nvram") == "/jobs/k/OVMF_VARS.fd"
    assert out.findtext("os/loader") == "/usr/share/OVMF/OVMF_CODE_4M.fd"


def test_a_saved_domain_without_the_disk_the_new_run_needs_is_refused():
    from vmloader.bootstrapper.domain import retarget_saved_xml
    seeded = replace(spec(), disks=spec().disks + (DiskSpec("/jobs/k/cidata.img", target="vdb", fmt="raw"),))
    with pytest.raises(SnapshotError, match="no disk vdb"):
        retarget_saved_xml(domain_xml(spec()), seeded)


def test_a_saved_uefi_domain_is_retargeted_at_the_new_runs_copy_of_the_variable_store():
    from vmloader.bootstrapper.domain import retarget_saved_xml
    uefi = BootSpec(None, None, firmware="uefi", loader="/usr/share/OVMF/OVMF_CODE_4M.fd",
                    nvram="/jobs/j/uefi-vars.fd")
    saved = domain_xml(replace(spec(), boot=uefi))
    new = replace(spec(), boot=replace(uefi, nvram="/jobs/k/uefi-vars.fd"),
                  disks=(DiskSpec("/jobs/k/overlay.qcow2", backing="/cache/artifacts/base"),))
    out = ET.fromstring(retarget_saved_xml(saved, new))
    assert out.findtext("os/nvram") == "/jobs/k/uefi-vars.fd"
    assert out.findtext("os/loader") == "/usr/share/OVMF/OVMF_CODE_4M.fd"


def test_a_kernel_boot_is_q35_with_every_virtio_device_on_its_own_root_bus_slot_and_no_usb():
    two_disks = replace(spec(), disks=(DiskSpec("/jobs/j/overlay.qcow2"), DiskSpec("/jobs/j/out.qcow2", target="vdb")))
    root = ET.fromstring(domain_xml(two_disks))
    assert root.find("os/type").get("machine") == "q35"
    slots = [(el.tag, el.find("address").get("bus"), el.find("address").get("slot"))
             for el in root.find("devices") if el.find("address") is not None]
    assert [tag for tag, _, _ in slots] == ["disk", "disk", "interface", "rng", "controller"]
    assert {bus for _, bus, _ in slots} == {"0x00"} and len({slot for _, _, slot in slots}) == 5
    assert root.find("devices/controller[@type='usb']").get("model") == "none"


def test_an_images_own_boot_loader_keeps_i440fx_with_addresses_left_to_libvirt():
    root = ET.fromstring(domain_xml(replace(spec(), boot=BootSpec(None, None))))
    assert root.find("os/type").get("machine") == "pc"
    assert root.find(".//address") is None and root.find("devices/controller") is None


@pytest.mark.parametrize("machine, bus", [("pc", "bus=pci.0"), ("q35", "bus=pcie.0")])
def test_the_isolated_nic_goes_on_the_root_bus_of_either_machine(machine, bus):
    args = NetworkSpec("none", isolated_nic=True).qemu_args("qemu", machine)
    assert bus in args[-1] and "addr=0x1e" in args[-1]

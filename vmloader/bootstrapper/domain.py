"""libvirt domain XML, built with ElementTree from typed specs (never string-pasted).

One small frozen dataclass per XML element we emit; `domain_xml(spec)`
serializes a whole domain. kvm and qemu (TCG) share the x86 HVM layout with
virtio devices; xen gets a PV domain with xen devices.
"""
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import SnapshotError

JOB_NS = "https://vmloader.org/xmlns/job/1"
ET.register_namespace("vmloader", JOB_NS)
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)
QGA_CHANNEL = "org.qemu.guest_agent.0"
# The translation cache of a TCG (hypervisor "qemu") VM. QEMU 7.2's default is 1 GiB, and a
# job running many programs fills it (1270 MiB of QEMU beside the guest's RAM, measured).
# In an HTCondor slot it is bounded to SLOT_TB_CACHE_MIB: with 64 MiB QEMU held at most 146 MiB
# beside the guest's RAM, and the memory a slot holds for QEMU (condor.QEMU_OVERHEAD_MIB) rests
# on that bound. Elsewhere the config's tcg_tb_cache_mib (default TCG_TB_CACHE_MIB) bounds it:
# a guest whose code outgrows the cache has it flushed and translated again, and a systemd and
# cloud-init boot took 67.6 s with 64 MiB, 58.3 with 128 and 51.9 with 256 (51.0 with 1 GiB;
# one stock image, one idle 2-core host; our own image's boot did not differ).
SLOT_TB_CACHE_MIB = 64
TCG_TB_CACHE_MIB = 256


def _sub(parent: ET.Element, tag: str, text: Optional[str] = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        element.text = text
    return element


@dataclass(frozen=True)
class DiskSpec:
    path: str
    target: str = "vda"
    fmt: str = "qcow2"
    readonly: bool = False
    backing: Optional[str] = None     # backing file libvirt must not relabel (the shared base)
    # Layers between the disk and `backing` (a kept snapshot booted again): libvirt
    # gives QEMU read access to them for the run and restores their owner after.
    middle: tuple = ()

    def to_element(self, hypervisor: str) -> ET.Element:
        disk = ET.Element("disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu" if hypervisor != "xen" else "qemu", type=self.fmt)
        _sub(disk, "source", file=self.path)
        if self.backing:
            disk.append(self._backing_element())
        if hypervisor == "xen":
            _sub(disk, "target", dev=self.target.replace("vd", "xvd"), bus="xen")
        else:
            _sub(disk, "target", dev=self.target, bus="virtio")
        if self.readonly:
            _sub(disk, "readonly")
        return disk

    def _backing_element(self) -> ET.Element:
        # The base is shared by every job and owned by the cache: QEMU only
        # reads it, so libvirt must not chown it to the QEMU user.
        chain = [(path, True) for path in self.middle] + [(self.backing, False)]
        stores = []
        for path, relabel in chain:
            element = ET.Element("backingStore", type="file")
            _sub(element, "format", type="qcow2")
            source = _sub(element, "source", file=path)
            if not relabel:
                _sub(source, "seclabel", model="dac", relabel="no")
            stores.append(element)
        for parent, child in zip(stores, stores[1:]):
            parent.append(child)
        _sub(stores[-1], "backingStore")
        return stores[0]


@dataclass(frozen=True)
class ChannelSpec:
    socket_path: str
    name: str = "org.vmloader.agent.0"

    def to_element(self, hypervisor: str) -> ET.Element:
        channel = ET.Element("channel", type="unix")
        _sub(channel, "source", mode="bind", path=self.socket_path)
        _sub(channel, "target", type="xen" if hypervisor == "xen" else "virtio", name=self.name)
        return channel


@dataclass(frozen=True)
class ConsoleSpec:
    log_path: str

    def to_elements(self, hypervisor: str) -> list:
        if hypervisor == "xen":
            console = ET.Element("console", type="pty")
            _sub(console, "log", file=self.log_path, append="off")
            _sub(console, "target", type="xen", port="0")
            return [console]
        serial = ET.Element("serial", type="pty")
        _sub(serial, "log", file=self.log_path, append="off")   # virtlogd writes it
        _sub(serial, "target", port="0")
        console = ET.Element("console", type="pty")
        _sub(console, "target", type="serial", port="0")
        return [serial, console]


@dataclass(frozen=True)
class NetworkSpec:
    mode: str = "user"          # "user": QEMU user-mode NAT; "none": no NIC at all
    # --network none for an image with its own boot: a NIC that reaches nothing (QEMU user
    # networking with restrict=on: DHCP answers, nothing beyond the VM), so the guest's
    # network-online wait ends at once instead of timing out after minutes.
    isolated_nic: bool = False

    def qemu_args(self, hypervisor: str, machine: str = "pc") -> list:
        """QEMU arguments libvirt's XML cannot say (user networking's restrict=on)."""
        if self.mode != "none" or not self.isolated_nic or hypervisor == "xen":
            return []
        bus = "pcie.0" if machine == "q35" else "pci.0"
        return ["-netdev", "user,id=vmlnone,restrict=on",
                "-device", f"virtio-net-pci,netdev=vmlnone,romfile=,bus={bus},addr=0x1e"]   # a slot libvirt leaves free

    def to_element(self, hypervisor: str) -> Optional[ET.Element]:
        if self.mode == "none":
            return None
        iface = ET.Element("interface", type="user" if hypervisor != "xen" else "bridge")
        if hypervisor == "xen":
            _sub(iface, "source", bridge="xenbr0")
        else:
            _sub(iface, "model", type="virtio")
            _sub(iface, "rom", enabled="no")     # no iPXE option ROM: we boot a kernel directly
        return iface


def machine_type(direct_kernel: bool) -> str:
    """The x86 machine type. A direct kernel boot (our images) gets Q35: under TCG its PCI
    interrupt links take a few ms each to enable, i440FX's about 0.14 s each (their ACPI
    methods), and the kernel reaches init sooner, about 1 s of a cold boot in all. An image's
    own boot loader (stock images) keeps i440FX ("pc"), as those were built and tested on."""
    return "q35" if direct_kernel else "pc"


@dataclass(frozen=True)
class BootSpec:
    """Direct kernel boot, or (kernel None) the disk's own boot loader via firmware:
    SeaBIOS ("bios"), or OVMF ("uefi": `loader` read-only code, `nvram` the job's own
    copy of the variable store)."""

    kernel: Optional[str]
    initrd: Optional[str]
    cmdline: str = ""
    firmware: str = "bios"
    loader: Optional[str] = None
    nvram: Optional[str] = None

    @property
    def machine(self) -> str:
        return machine_type(direct_kernel=self.kernel is not None)

    def to_element(self, hypervisor: str) -> ET.Element:
        os_el = ET.Element("os")
        if hypervisor == "xen":
            _sub(os_el, "type", "linux")
        else:
            _sub(os_el, "type", "hvm", arch="x86_64", machine=self.machine)
        if self.kernel is None and self.firmware == "uefi" and hypervisor != "xen":
            if not self.loader or not self.nvram:
                raise ValueError("UEFI boot needs the OVMF code and the job's variable store")
            _sub(os_el, "loader", self.loader, readonly="yes", type="pflash")
            _sub(os_el, "nvram", self.nvram)
        if self.kernel is None:
            if hypervisor != "xen":          # xen: DomainSpec adds a <bootloader> instead
                _sub(os_el, "boot", dev="hd")
            if hypervisor != "xen" and self.firmware != "uefi":
                # SeaBIOS writes to the serial console too (QEMU's graphics=off): its "No bootable
                # device" reaches the console log, so such a disk fails at once (delivery.py).
                _sub(os_el, "bios", useserial="yes")
            return os_el
        _sub(os_el, "kernel", self.kernel)
        if self.initrd:
            _sub(os_el, "initrd", self.initrd)
        _sub(os_el, "cmdline", self.cmdline)
        return os_el


@dataclass(frozen=True)
class JobMetadata:
    job_id: str
    user: str
    image: str
    image_sha256: str
    owner_pid: int

    def to_element(self) -> ET.Element:
        job = ET.Element(f"{{{JOB_NS}}}job")
        for key in ("job_id", "user", "image", "image_sha256"):
            _sub(job, f"{{{JOB_NS}}}{key}", getattr(self, key))
        _sub(job, f"{{{JOB_NS}}}owner_pid", str(self.owner_pid))
        return job


@dataclass(frozen=True)
class DomainSpec:
    name: str
    hypervisor: str               # "kvm" | "qemu" | "xen"
    memory_mib: int
    vcpus: int
    boot: BootSpec
    disks: Sequence[DiskSpec]
    channel: ChannelSpec
    console: ConsoleSpec
    network: NetworkSpec = NetworkSpec()
    metadata: Optional[JobMetadata] = None
    uuid: Optional[str] = None
    attach_channels: Sequence[ChannelSpec] = ()   # more agent ports: a shell can attach beside the job
    qga_channel: Optional[ChannelSpec] = None      # the QEMU guest agent's port (images with their own boot)
    smbios_serial: Optional[str] = None            # "ds=nocloud": cloud-init reads the seed disk only
    tb_cache_mib: Optional[int] = TCG_TB_CACHE_MIB  # qemu (TCG) only: MiB of translation cache

    def channels(self) -> list:
        return [self.channel, *self.attach_channels] + ([self.qga_channel] if self.qga_channel else [])

    def to_element(self) -> ET.Element:
        hv = self.hypervisor
        root = ET.Element("domain", type=hv)
        _sub(root, "name", self.name)
        if self.uuid:
            _sub(root, "uuid", self.uuid)
        if self.metadata:
            _sub(root, "metadata").append(self.metadata.to_element())
        _sub(root, "memory", str(self.memory_mib), unit="MiB")
        _sub(root, "vcpu", str(self.vcpus))
        if hv == "xen" and self.boot.kernel is None:
            _sub(root, "bootloader", "/usr/lib/xen/bin/pygrub")
        if self.smbios_serial and hv != "xen":
            system = _sub(_sub(root, "sysinfo", type="smbios"), "system")
            _sub(system, "entry", self.smbios_serial, name="serial")
        os_el = self.boot.to_element(hv)
        if self.smbios_serial and hv != "xen":
            _sub(os_el, "smbios", mode="sysinfo")
        root.append(os_el)
        if hv != "xen":
            features = _sub(root, "features")
            _sub(features, "acpi")                    # without ACPI, poweroff only halts
            if hv == "qemu" and self.tb_cache_mib:
                # QEMU's TCG translation cache otherwise grows to hundreds of MiB beside the
                # guest's RAM: bounded, what a VM holds is its RAM plus a stated overhead.
                _sub(_sub(features, "tcg"), "tb-cache", str(self.tb_cache_mib), unit="MiB")
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            _sub(root, event, "destroy")
        root.append(self._devices())
        args = self.network.qemu_args(hv, self.boot.machine)
        if args:
            line = _sub(root, f"{{{QEMU_NS}}}commandline")
            for arg in args:
                _sub(line, f"{{{QEMU_NS}}}arg", value=arg)
        return root

    def _devices(self) -> ET.Element:
        hv = self.hypervisor
        devices = ET.Element("devices")
        for disk in self.disks:
            devices.append(disk.to_element(hv))
        for channel in self.channels():
            devices.append(channel.to_element(hv))
        devices.extend(self.console.to_elements(hv))
        iface = self.network.to_element(hv)
        if iface is not None:
            devices.append(iface)
        if hv != "xen":
            rng = _sub(devices, "rng", model="virtio")
            _sub(rng, "backend", "/dev/urandom", model="random")
            _sub(devices, "memballoon", model="none")
            if self.boot.machine == "q35":
                self._on_the_root_bus(devices)
        return devices

    @staticmethod
    def _on_the_root_bus(devices: ET.Element) -> None:
        """Q35: every virtio device on the root bus at a fixed slot, and no USB. Left to itself
        libvirt puts each behind a PCIe root port of its own and adds a USB controller: more for
        the kernel to probe at each boot, nothing a job uses (no hotplug, no USB)."""
        serial = ET.Element("controller", type="virtio-serial", index="0")
        placed = [el for el in devices if el.tag in ("disk", "interface", "rng")] + [serial]
        for slot, element in enumerate(placed, start=2):
            _sub(element, "address", type="pci", domain="0x0000", bus="0x00", slot=f"0x{slot:02x}",
                 function="0x0")
        devices.append(serial)
        _sub(devices, "controller", type="usb", model="none")


def domain_xml(spec: DomainSpec) -> str:
    element = spec.to_element()
    ET.indent(element)
    return ET.tostring(element, encoding="unicode") + "\n"


def _required(parent: ET.Element, path: str) -> ET.Element:
    """`parent.find(path)` of saved XML that must have it: without it the state file is damaged."""
    element = parent.find(path)
    if element is None:
        raise SnapshotError(f"its saved domain XML has no {path} in <{parent.tag}>")
    return element


SYSTEM_ONLY = ("seclabel", "resource")      # (anywhere) what a session daemon cannot take from a system one


def retarget_saved_xml(saved_xml: str, spec: DomainSpec, foreign: bool = False) -> str:
    """The domain XML kept in a memory state file, pointed at a new run's files.

    Resuming must keep the guest's hardware exactly as saved (libvirt checks the ABI),
    so only host-side paths change: the disk (a fresh throwaway overlay over the kept
    one), a UEFI variable store, the agent sockets, the console log; plus the name and job metadata. `foreign`:
    saved by another libvirt daemon (root's, qemu:///system) and restored by a user's session
    daemon: the security labels (QEMU's user under the system daemon) and the cgroup
    partition are host-side and system-only, so they go (the session daemon sets its own).
    """
    root = ET.fromstring(saved_xml)
    if foreign:
        _remove_everywhere(root, SYSTEM_ONLY)
    _required(root, "name").text = spec.name       # the uuid stays: libvirt requires the saved one
    metadata = root.find("metadata")
    if metadata is None:
        metadata = _sub(root, "metadata")
    for old in metadata.findall(f"{{{JOB_NS}}}job"):
        metadata.remove(old)
    if spec.metadata:
        metadata.append(spec.metadata.to_element())
    nvram = root.find("os/nvram")
    if nvram is not None and spec.boot.nvram:     # UEFI: the run's own copy of the kept variable store
        nvram.text = spec.boot.nvram
    devices = _required(root, "devices")
    _retarget_disks(devices, spec)
    by_name = {c.name: c for c in spec.channels()}
    for channel in devices.findall("channel"):
        target = by_name.get(_required(channel, "target").get("name"))
        if target is not None:
            _required(channel, "source").set("path", target.socket_path)
    for serial in devices.findall("serial"):
        log = serial.find("log")
        if log is not None:
            log.set("file", spec.console.log_path)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _retarget_disks(devices: ET.Element, spec: DomainSpec) -> None:
    """Each saved disk replaced by the new run's disk on the same target (vda: the overlay; vdb: a
    stock image's cloud-init seed, which lived in the saved job's directory), keeping its address."""
    saved = {_required(d, "target").get("dev"): d for d in devices.findall("disk[@device='disk']")}
    for new in spec.disks:
        new_disk = new.to_element(spec.hypervisor)
        dev = _required(new_disk, "target").get("dev")
        disk = saved.get(dev)
        if disk is None:
            raise SnapshotError(f"its saved domain XML has no disk {dev}")
        for keep in ("address", "alias"):
            element = disk.find(keep)
            if element is not None:
                new_disk.append(element)
        devices.insert(list(devices).index(disk), new_disk)
        devices.remove(disk)


def _remove_everywhere(root: ET.Element, tags: tuple) -> None:
    for parent in list(root.iter()):
        for child in list(parent):
            if child.tag in tags:
                parent.remove(child)


def read_job_metadata(xml: str) -> Optional[JobMetadata]:
    """Our job metadata from a live domain's XML, or None for domains that aren't ours."""
    root = ET.fromstring(xml)
    job = root.find(f"metadata/{{{JOB_NS}}}job")
    if job is None:
        return None
    value = lambda key: job.findtext(f"{{{JOB_NS}}}{key}", default="")
    try:
        pid = int(value("owner_pid"))
    except ValueError:
        pid = 0
    return JobMetadata(value("job_id"), value("user"), value("image"), value("image_sha256"), pid)

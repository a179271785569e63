"""Which hypervisors this worker can really use, decided by probing, with reasons.

/dev/kvm existing proves little: on PVM hosts (module kvm_pvm) libvirt
advertises `kvm` yet ordinary guest kernels hang. So KVM counts as usable
only when the CPU has vmx/svm, the module is a hardware one, libvirt offers
it, and (when a guest kernel is at hand) a real kernel boots under it.
"""
import hashlib
import json
import os
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import libvirt

from . import virt
from .catalog import atomic_write_text
from .errors import HypervisorError, LibvirtError

ORDER = ("kvm", "qemu", "xen")
PROBE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Hypervisor:
    name: str
    usable: bool
    reason: str
    uri: str
    domain_type: str

    def to_dict(self) -> dict:
        return asdict(self)


class HostProbes:
    """The real host checks. Tests replace this with a fake of the same shape."""

    def __init__(self, euid: Optional[int] = None, probe_kernel: Optional[tuple] = None,
                 cache_path: Optional[Path] = None):
        self.euid = os.geteuid() if euid is None else euid
        self.probe_kernel = probe_kernel          # (kernel, initrd) of a standard guest, if cached
        self.cache_path = cache_path or _default_probe_cache(self.euid)

    def libvirt_domain_types(self, uri: str) -> tuple:
        """Domain types libvirt offers for x86_64 guests, or () with why not."""
        try:
            conn = virt.connect(uri)
        except LibvirtError as exc:
            return (), exc.message
        try:
            caps = ET.fromstring(conn.getCapabilities())
        except libvirt.libvirtError as exc:
            return (), str(exc)
        finally:
            conn.close()
        types = {d.get("type") for d in caps.findall("guest/arch/domain")}
        return tuple(sorted(t for t in types if t)), ""

    def kvm_device(self) -> bool:
        return os.access("/dev/kvm", os.R_OK | os.W_OK)

    def kvm_modules(self) -> set:
        return {m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if Path("/sys/module", m).exists()}

    def cpu_virt_flags(self) -> set:
        try:
            words = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            return set()
        return words & {"vmx", "svm"}

    def xen_present(self) -> bool:
        return Path("/proc/xen").exists() or Path("/sys/hypervisor/type").exists() and \
            Path("/sys/hypervisor/type").read_text().strip() == "xen"

    def kvm_boots_a_kernel(self) -> tuple:
        """Boot a standard guest kernel under -accel kvm; (ok, reason). Cached per host boot."""
        if not self.probe_kernel:
            return True, "no guest kernel cached yet to test-boot; hardware checks passed"
        key = _probe_key(self.probe_kernel)
        cached = _read_cache(self.cache_path).get(key)
        if cached:
            return cached["ok"], cached["reason"]
        ok, reason = _boot_probe(*self.probe_kernel)
        _write_cache(self.cache_path, key, {"ok": ok, "reason": reason})
        return ok, reason


def _default_probe_cache(euid: int) -> Path:
    base = "/run/vmloader" if euid == 0 else os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"kvm-probe-{euid}.json"


def _probe_key(kernel_pair: tuple) -> str:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    return hashlib.sha256(f"{boot_id}:{kernel_pair[0]}".encode()).hexdigest()[:16]


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, value: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = value
        atomic_write_text(path, json.dumps(data))
    except OSError:
        pass   # a probe cache is an optimisation only


def _boot_probe(kernel: str, initrd: str) -> tuple:
    """A kernel that powers off right after init starts: exits by itself only if KVM runs it."""
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-m", "256", "-display", "none", "-no-reboot",
            "-nodefaults", "-kernel", kernel, "-initrd", initrd,
            "-append", "panic=-1 reboot=t rdinit=/bin/true"]
    started = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except FileNotFoundError:
        return False, "qemu-system-x86_64 is not installed"
    try:
        _, err = proc.communicate(timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False, f"a standard guest kernel did not finish booting under KVM within {PROBE_TIMEOUT:.0f} s"
    if proc.returncode != 0:
        return False, f"qemu -accel kvm failed: {err.decode(errors='replace').strip()[-200:]}"
    return True, f"a standard guest kernel booted under KVM in {time.monotonic() - started:.1f} s"


def _kvm(probes, uri: str, types: tuple, why_no_libvirt: str) -> Hypervisor:
    def verdict(ok: bool, reason: str) -> Hypervisor:
        return Hypervisor("kvm", ok, reason, uri, "kvm")
    if not probes.kvm_device():
        return verdict(False, "/dev/kvm is missing or not accessible to this user")
    modules = probes.kvm_modules()
    if "kvm_pvm" in modules:
        return verdict(False, "KVM module is kvm_pvm (PVM): ordinary guest kernels hang under it"
                              + ("" if probes.cpu_virt_flags() else "; the CPU has no vmx/svm"))
    if not probes.cpu_virt_flags():
        return verdict(False, "the CPU has no vmx/svm flags: no hardware virtualization")
    if "kvm" not in types:
        return verdict(False, f"libvirt does not offer kvm domains{': ' + why_no_libvirt if why_no_libvirt else ''}")
    return verdict(*probes.kvm_boots_a_kernel())


def detect(probes) -> list:
    uri = virt.default_uri("qemu", probes.euid)
    types, why = probes.libvirt_domain_types(uri)
    found = [_kvm(probes, uri, types, why)]
    if "qemu" in types:
        found.append(Hypervisor("qemu", True, "QEMU TCG software emulation via libvirt (slower, always works)",
                                uri, "qemu"))
    else:
        found.append(Hypervisor("qemu", False, f"libvirt at {uri} offers no qemu domains"
                                + (f": {why}" if why else ""), uri, "qemu"))
    xen_uri = virt.default_uri("xen", probes.euid)
    if probes.xen_present():
        found.append(Hypervisor("xen", True, "Xen detected (/proc/xen)", xen_uri, "xen"))
    else:
        found.append(Hypervisor("xen", False, "not running under a Xen dom0 (no /proc/xen)", xen_uri, "xen"))
    return found


def choose(found: Sequence[Hypervisor], forced: Optional[str] = None) -> Hypervisor:
    by_name = {h.name: h for h in found}
    usable = [h.name for h in found if h.usable]
    if forced:
        chosen = by_name.get(forced)
        if chosen is None or not chosen.usable:
            reason = chosen.reason if chosen else "unknown hypervisor"
            raise HypervisorError(f"--hypervisor {forced} is not usable here: {reason}",
                                  hint=f"usable here: {', '.join(usable) or 'none'} (see `vmloader hypervisors`)",
                                  phase="hypervisor")
        return chosen
    for name in ("kvm", "qemu", "xen"):
        if by_name.get(name) and by_name[name].usable:
            return by_name[name]
    reasons = "; ".join(f"{h.name}: {h.reason}" for h in found)
    raise HypervisorError(f"no usable hypervisor on this worker ({reasons})",
                          hint="install qemu-system-x86 and libvirt-daemon-system and start libvirtd",
                          phase="hypervisor")

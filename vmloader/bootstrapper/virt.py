"""The one place that opens libvirt connections and translates libvirt errors."""
import libvirt

from .errors import LibvirtError

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

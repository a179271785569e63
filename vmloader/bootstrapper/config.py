"""One typed, frozen configuration object, built from file + environment + flags.

Every setting is declared once in SETTINGS: its config-file key, its
environment variable and how to parse it. Files are read in order
(/etc/vmloader/config.toml, then ~/.config/vmloader/config.toml), then the
environment, then explicit overrides (CLI flags) win.
"""
import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .domain import SLOT_TB_CACHE_MIB, TCG_TB_CACHE_MIB
from .errors import ConfigError

SYSTEM_CONFIG = Path("/etc/vmloader/config.toml")


def _user_config() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "vmloader" / "config.toml"


def _default_cache_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/cache/vmloader")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "vmloader"


def _default_user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "vmloader"


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/vmloader")
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "vmloader"


def _path(value: Any) -> Path:
    return Path(os.path.expanduser(str(value)))


def _str_list(value: Any) -> tuple:
    if isinstance(value, str):
        return tuple(v for v in value.split() if v)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError("expected a list of strings or a space-separated string")


def _policy(value: Any) -> str:
    text = str(value).replace("_", "-")
    if text not in ("always", "on-failure", "never"):
        raise ValueError("expected always, on-failure or never")
    return text


def _qemu_cgroup(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ("caller", "libvirt"):
        raise ValueError("expected caller or libvirt")
    return text


def _size(value: Any) -> int:
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    factor = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(text[-1:], 1)
    number = int(float(text[:-1] if factor > 1 else text) * factor)
    if number < 0:
        raise ValueError("expected a size such as 50G")
    return number


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _positive_int(value: Any) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("expected a positive whole number")
    return number


def _non_negative(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(value: Any):
        number = kind(value)
        if number < 0:
            raise ValueError("expected 0 (no limit) or a positive number")
        return number
    return parse


@dataclass(frozen=True)
class Setting:
    key: str
    env: str                   # "": no environment variable
    parse: Callable[[Any], Any]
    help: str
    admin_only: bool = False   # only the worker's own config file (/etc/vmloader/config.toml) may set it


SETTINGS: Sequence[Setting] = (
    Setting("cache_dir", "VMLOADER_CACHE_DIR", _path, "verified image cache"),
    Setting("user_cache_dir", "VMLOADER_USER_CACHE_DIR", _path,
            "your own images (`images add`, --image URL) when cache_dir is another user's shared cache"),
    Setting("cache_socket", "VMLOADER_CACHE_SOCKET", _path,
            "socket of the shared cache's service (vmloader cache serve; default: <cache_dir>/service.sock)"),
    Setting("state_dir", "VMLOADER_STATE_DIR", _path, "job dirs and snapshot store"),
    Setting("repositories", "VMLOADER_REPOSITORY", _str_list,
            "image repository URLs or directories, tried in order"),
    Setting("libvirt_uri", "VMLOADER_LIBVIRT_URI", str, "libvirt URI (default: by hypervisor and user)"),
    Setting("snapshot_policy", "VMLOADER_SNAPSHOT", _policy, "default --snapshot policy"),
    Setting("boot_timeout", "VMLOADER_BOOT_TIMEOUT", _positive_int,
            "seconds a guest may take to reach the agent"),
    Setting("stock_boot_grace", "VMLOADER_STOCK_BOOT_GRACE", _positive_int,
            "seconds an image with its own boot (a stock image) has, once its boot finished (the login "
            "prompt on its console), for vmloader's agent, qemu-guest-agent or cloud-init to answer before "
            "the job fails naming what was looked for (default 30; at least 120 once the console says "
            "qemu-ga started)"),
    Setting("cache_max_bytes", "VMLOADER_CACHE_MAX_BYTES", _size,
            "cache bound in bytes (suffixes K M G T); least recently used images go first; 0 = unbounded"),
    Setting("memory_mib", "VMLOADER_MEMORY", _positive_int, "default guest memory (MiB)"),
    Setting("cpus", "VMLOADER_CPUS", _positive_int, "default guest vCPUs"),
    Setting("snapshot_max_count", "VMLOADER_SNAPSHOT_MAX_COUNT", _non_negative(int),
            "keep at most this many snapshots per user, oldest pruned first (0 = no limit)"),
    Setting("snapshot_max_bytes", "VMLOADER_SNAPSHOT_MAX_BYTES", _size,
            "bound on the snapshot store's size (suffixes K M G T; 0 = no limit)"),
    Setting("snapshot_max_age_days", "VMLOADER_SNAPSHOT_MAX_AGE_DAYS", _non_negative(float),
            "prune snapshots older than this many days (0 = never)"),
    Setting("output_max_bytes", "VMLOADER_OUTPUT_MAX_BYTES", _size,
            "largest file copied back from a guest (suffixes K M G T); a larger one is cut off and dropped"),
    Setting("warm_start", "VMLOADER_WARM_START", _bool,
            "start jobs from a saved, already-booted state of their image (default true; false: "
            "every job boots cold)"),
    Setting("warm_lanes", "VMLOADER_WARM_LANES", _non_negative(int),
            "saved states per image and shape, one per job starting at once (default 2 x host CPUs; "
            "0 = that default); more concurrent jobs boot cold"),
    Setting("warm_own_states", "VMLOADER_WARM_OWN_STATES", _bool,
            "build a warm state of your own when no shared one (root's) serves the job (default true; "
            "HTCondor jobs never do: they restore root's or boot cold)"),
    Setting("keep_warm", "VMLOADER_KEEP_WARM", _str_list,
            "images whose warm states root's cache service (`vmloader cache serve`) keeps ready in the "
            "shared cache, for their default shape, warm_lanes of each (0: one per host CPU): names, or "
            '"*" for every cached image; default none. HTCondor jobs restore these and never build one'),
    Setting("tcg_tb_cache_mib", "VMLOADER_TCG_TB_CACHE_MIB", _positive_int,
            f"MiB of translation cache a QEMU without KVM (TCG) holds beside the guest's RAM (default "
            f"{TCG_TB_CACHE_MIB}; smaller saves memory and costs CPU: heavy guests are translated again). "
            f"HTCondor jobs use {SLOT_TB_CACHE_MIB} whatever this says: their slot counts QEMU's memory"),
    Setting("qemu_cgroup", "VMLOADER_QEMU_CGROUP", _qemu_cgroup,
            "as root (system libvirtd): `caller` starts each VM paused and moves QEMU into vmloader's own "
            "cgroups so their limits and accounting cover the VM (always so under the HTCondor wrapper); "
            "`libvirt` (default) leaves it in libvirt's machine cgroup"),
    Setting("host_cert", "VMLOADER_HOST_CERT", _path,
            "host certificate copied as /etc/grid-security/hostcert.pem into the guests host_cert_images "
            "and host_cert_users allow"),
    Setting("host_key", "VMLOADER_HOST_KEY", _path,
            "host key copied as /etc/grid-security/hostkey.pem (mode 0600) into the guests host_cert_images "
            "and host_cert_users allow"),
    Setting("host_cert_images", "", _str_list,
            "images whose guests get host_cert and host_key (any job that is root in them can read the key); "
            "default none", admin_only=True),
    Setting("host_cert_users", "", _str_list,
            "users whose guests get host_cert and host_key (any job of theirs that is root in the guest can "
            "read the key); default none", admin_only=True),
)


@dataclass(frozen=True)
class Config:
    cache_dir: Path
    state_dir: Path
    user_cache_dir: Optional[Path] = None
    cache_socket: Optional[Path] = None
    repositories: tuple = ()
    libvirt_uri: Optional[str] = None
    snapshot_policy: str = "on-failure"
    boot_timeout: int = 180
    stock_boot_grace: int = 30
    cache_max_bytes: int = 50 * 2**30
    memory_mib: int = 1024
    cpus: int = 1
    snapshot_max_count: int = 20
    snapshot_max_bytes: int = 0
    snapshot_max_age_days: float = 14
    output_max_bytes: int = 16 * 2**30
    warm_start: bool = True
    warm_lanes: int = 0
    warm_own_states: bool = True
    keep_warm: tuple = ()
    tcg_tb_cache_mib: int = TCG_TB_CACHE_MIB
    qemu_cgroup: str = "libvirt"   # "caller": QEMU joins vmloader's cgroups (qemucgroup.py)
    host_cert: Optional[Path] = None
    host_key: Optional[Path] = None
    host_cert_images: tuple = ()
    host_cert_users: tuple = ()

    @property
    def own_cache_dir(self) -> Path:
        return self.user_cache_dir or _default_user_cache_dir()

    @property
    def service_socket(self) -> Path:
        return self.cache_socket or self.cache_dir / "service.sock"

    @property
    def jobs_dir(self) -> Path:
        return self.state_dir / "jobs"

    @property
    def snapshots_dir(self) -> Path:
        return self.state_dir / "snapshots"

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def _read_file(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}",
                          hint="fix the file or remove it") from None


def _parse(setting: Setting, value: Any, origin: str) -> Any:
    try:
        return setting.parse(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"bad value {value!r} for {setting.key} in {origin}: {exc}",
                          hint=f"{setting.key}: {setting.help}") from None


def load(overrides: Optional[Mapping[str, Any]] = None,
         environ: Optional[Mapping[str, str]] = None,
         files: Optional[Sequence[Path]] = None,
         admin_files: Optional[Sequence[Path]] = None) -> Config:
    """`admin_files`: those of `files` that may set admin-only settings (default: the system config,
    when `files` is left at its default; none otherwise)."""
    environ = os.environ if environ is None else environ
    if files is None:
        files, admin_files = (SYSTEM_CONFIG, _user_config()), (SYSTEM_CONFIG,)
    admin = {Path(p) for p in admin_files or ()}
    values: dict = {"cache_dir": _default_cache_dir(), "state_dir": _default_state_dir()}
    known = {s.key: s for s in SETTINGS}
    for path in files:
        for key, value in _read_file(Path(path)).items():
            if key not in known:
                raise ConfigError(f"unknown setting {key!r} in {path}",
                                  hint="known settings: " + ", ".join(sorted(known)))
            if known[key].admin_only and Path(path) not in admin:
                raise ConfigError(f"{key} may be set only in the worker's config {SYSTEM_CONFIG}, not in {path}",
                                  hint=f"remove it from {path}; {key}: {known[key].help}")
            values[key] = _parse(known[key], value, str(path))
    for setting in SETTINGS:
        if setting.env and environ.get(setting.env):
            values[setting.key] = _parse(setting, environ[setting.env], setting.env)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _parse(known[key], value, "the command line")
    return Config(**values)

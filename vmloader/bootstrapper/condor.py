"""HTCondor integration on the execute side: the job wrapper and the startd probe.

The wrapper (USER_JOB_WRAPPER, see condor/config.d/) runs every job. A job whose
ad has no `VMImage` is exec'd untouched. Otherwise its sandbox goes into a
fresh VM of that image, the command runs there, its stdout/stderr are the
job's, new files come back for output transfer, and the exit code is the job's.

An infrastructure failure is never an ordinary exit: the wrapper sets
`VMLoaderHoldReason` in the job ad (chirp) and the schedd transform's
`on_exit_hold` puts the job on hold with that reason. Where a snapshot was
kept, `VMLoaderSnapshot` is set to `worker:path`.
"""
import math
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from . import cgroups, classad, config as config_mod, disklimit, domain, hypervisors, sandboxnames, sshtojob
from . import warm
from .cache import ImageCache
from .errors import EXIT_INFRA, UsageError, VMLoaderError
from . import runners
from .guesttext import escape
from .job import GuestFile, JobSpec

HOLD_ATTR = "VMLoaderHoldReason"
SNAPSHOT_ATTR = "VMLoaderSnapshot"           # after the job: where its state was kept
POLICY_ATTR = "VMLoaderSnapshotPolicy"       # the user's +VMLoaderSnapshot, copied by the transform
# Files the starter puts into the sandbox for itself: not the job's input.
STARTER_FILES = frozenset((".job.ad", ".machine.ad", ".chirp.config", ".update.ad", "_condor_stdout",
                           "_condor_stderr", ".condor_creds", "tmp", "var", sandboxnames.VMLOADER_POINTER))
# What one VM's QEMU holds beside the guest's RAM, in MiB: under TCG its translation cache
# (bounded by domain.SLOT_TB_CACHE_MIB, 64) and 80-95 MiB of its own (146 MiB peak measured);
# less under KVM. The VM of a slot that requests M MiB gets M - QEMU_OVERHEAD_MIB; the schedd
# transform's default request (50-vmloader-schedd.conf, VMLOADER_QEMU_OVERHEAD_MIB) uses it too.
QEMU_OVERHEAD_MIB = 192
MIN_GUEST_MEMORY_MIB = 256                   # the smallest guest our images boot and run a job in
# request_disk (KiB) bounds the job's disk: the sandbox's files plus what the VM writes into its
# overlay. A boot and a small command write ~2.5 MiB there (journal, logs; measured on the pool); below this
# the job would stop at its limit before it started, so the request is held up front.
MIN_OVERLAY_MIB = 64
CHIRP_PATHS = ("/usr/libexec/condor/condor_chirp", "/usr/lib/condor/libexec/condor_chirp")


class JobAdError(UsageError):
    """A VMLoader attribute in the job ad has the wrong type or value."""

    def __init__(self, message: str, hint: Optional[str] = None, phase: Optional[str] = "job ad"):
        super().__init__(message, hint=hint, phase=phase)


@dataclass(frozen=True)
class VMRequest:
    """What a job ad asks of vmloader."""
    image: str
    root: bool = False
    snapshot: Optional[str] = None
    timeout: Optional[float] = None
    cpus: Optional[int] = None
    memory_mib: Optional[int] = None         # the guest's RAM: the slot's request less QEMU_OVERHEAD_MIB
    disk_kib: Optional[int] = None           # RequestDisk, evaluated: bounds sandbox + the VM's overlay
    outputs: Optional[tuple] = None          # TransferOutput; None: every new or changed file
    env_names: tuple = ()
    label: str = ""


def vm_request(ad: classad.Ad, machine: Optional[classad.Ad] = None,
               cgroup_limit: Optional[int] = None) -> Optional[VMRequest]:
    """None for an ordinary job (no VMImage); JobAdError for a malformed VMLoader attribute.
    Values are evaluated as the starter does: in the job ad, with the machine ad as TARGET.
    `cgroup_limit`: the job's cgroup memory limit in bytes (HTCondor's cgroup limits), if any."""
    value = lambda name: ad.evaluate(name, machine)
    image = value("VMImage")
    if image is classad.UNDEFINED and "VMImage" not in ad:
        return None
    if not isinstance(image, str) or not image.strip():
        raise JobAdError(f"+VMImage must be a string naming an image, not {classad.type_name(image)}",
                         hint='write e.g. +VMImage = "debian-12" (with quotes); fix it with condor_qedit '
                              'and condor_release the job')
    image = image.strip()
    root = _defined(value("VMLoaderRoot"), False)
    if not isinstance(root, bool):
        raise JobAdError(f"+VMLoaderRoot must be True or False, not {classad.type_name(root)} ({root!r})",
                         hint="write +VMLoaderRoot = True (no quotes)")
    timeout = _defined(value("VMLoaderTimeout"), None)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or timeout <= 0):
        raise JobAdError(f"+VMLoaderTimeout must be a positive number of seconds, not {timeout!r}",
                         hint="write e.g. +VMLoaderTimeout = 3600")
    outputs = value("TransferOutput")
    return VMRequest(
        image=image, root=root, snapshot=_snapshot_policy(ad, value),
        timeout=float(timeout) if timeout else _within_walltime(value("AllowedJobDuration")),
        cpus=_vm_cpus(_request(ad, machine, "RequestCpus"), machine),
        memory_mib=_vm_memory(_request(ad, machine, "RequestMemory"), image, machine, cgroup_limit),
        disk_kib=_vm_disk(_request(ad, machine, "RequestDisk"), machine),
        outputs=tuple(o.strip() for o in outputs.split(",") if o.strip()) if isinstance(outputs, str) else None,
        env_names=_env_names(value("Environment")),
        label=f"{_defined(value('ClusterId'), 0)}.{_defined(value('ProcId'), 0)}")


def _defined(value: Any, default: Any) -> Any:
    return default if value is classad.UNDEFINED else value


def _snapshot_policy(ad: classad.Ad, value) -> Optional[str]:
    """The transform copies +VMLoaderSnapshot to VMLoaderSnapshotPolicy (the wrapper reuses
    VMLoaderSnapshot to say where the state was kept)."""
    policy = value("VMLoaderSnapshotPolicy") if "VMLoaderSnapshotPolicy" in ad else value("VMLoaderSnapshot")
    if policy is classad.UNDEFINED:
        return None
    text = policy.replace("_", "-") if isinstance(policy, str) else None
    if text not in ("always", "on-failure", "never"):
        raise JobAdError(f"+VMLoaderSnapshot must be \"always\", \"on_failure\" or \"never\", not {policy!r}",
                         hint='write e.g. +VMLoaderSnapshot = "on_failure"')
    return text


def _within_walltime(allowed: Any) -> Optional[float]:
    """HTCondor's `allowed_job_duration` (walltime): time the job out a little earlier
    ourselves, so its VM is frozen with its memory for `snapshot boot` before HTCondor
    holds the job and kills everything."""
    if isinstance(allowed, bool) or not isinstance(allowed, (int, float)) or allowed <= 0:
        return None
    return max(1.0, float(allowed) - min(60.0, 0.05 * float(allowed)))


def _request(ad: classad.Ad, machine: Optional[classad.Ad], name: str) -> Optional[int]:
    """A request (RequestCpus/Memory/Disk) as a whole number; None when the job has none."""
    if name not in ad:
        return None
    value = ad.evaluate(name, machine)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JobAdError(f"{name} evaluates to {classad.type_name(value)}, not a number",
                         hint="check the submit file's request_* lines (condor_q -l ID -af:r " + name + ")")
    return math.ceil(value)


def _slot(machine: Optional[classad.Ad], name: str) -> Optional[int]:
    """The slot's own size (Memory in MiB, Cpus): the starter's limits are the slot's."""
    value = _machine_value(machine, name)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def _vm_cpus(cpus: Optional[int], machine: Optional[classad.Ad]) -> Optional[int]:
    if cpus is None:
        return None
    slot = _slot(machine, "Cpus")
    return max(1, min(cpus, slot) if slot else cpus)


def _vm_memory(request: Optional[int], image: str, machine: Optional[classad.Ad],
               cgroup_limit: Optional[int] = None) -> Optional[int]:
    """The guest's RAM: the slot's request_memory less what QEMU itself holds beside it
    (QEMU_OVERHEAD_MIB), so the whole VM stays within the slot (its Memory, and the job's cgroup
    memory limit where HTCondor sets one: QEMU runs in the job's cgroup). No request: the image's default."""
    if request is None:
        return None
    bounds = [(request, "")]
    slot = _slot(machine, "Memory")
    if slot:
        bounds.append((slot, f" (slot memory {slot} MiB)"))
    if cgroup_limit:
        bounds.append((cgroup_limit // 2 ** 20, f" (the job's cgroup memory limit {cgroup_limit // 2 ** 20} MiB)"))
    budget, bound = min(bounds, key=lambda b: b[0])
    if budget - QEMU_OVERHEAD_MIB < MIN_GUEST_MEMORY_MIB:
        need = MIN_GUEST_MEMORY_MIB + QEMU_OVERHEAD_MIB
        what = f"request_memory {request} MiB" + (bound if budget != request else "")
        raise JobAdError(f"{what} is too small for a VM of {image}: a VM needs at least {need} MiB "
                         f"({MIN_GUEST_MEMORY_MIB} MiB for the guest + {QEMU_OVERHEAD_MIB} MiB for QEMU)",
                         hint=f"request_memory = {need} or more, or leave request_memory out for the "
                              "image's default VM size")
    return budget - QEMU_OVERHEAD_MIB


def _vm_disk(request: Optional[int], machine: Optional[classad.Ad]) -> Optional[int]:
    """The job's disk in KiB: its request_disk, at most the slot's `Disk`."""
    if request is None:
        return None
    slot = _slot(machine, "Disk")
    return min(request, slot) if slot else request


def disk_limit(request: VMRequest, sandbox_bytes: int) -> Optional[disklimit.DiskLimit]:
    """What the VM's overlay may hold: request_disk less what the sandbox's files take there.
    JobAdError when that leaves less than a VM needs to boot and run a job (MIN_OVERLAY_MIB)."""
    if request.disk_kib is None:
        return None
    sandbox_kib = math.ceil(sandbox_bytes / 1024)
    room = request.disk_kib * 1024 - sandbox_bytes
    need_kib = MIN_OVERLAY_MIB * 1024 + sandbox_kib
    if room < MIN_OVERLAY_MIB * disklimit.MIB:
        raise JobAdError(f"request_disk {request.disk_kib} KiB is too small for a VM of {request.image}: its disk "
                         f"needs at least {MIN_OVERLAY_MIB} MiB for what the VM writes, beside the sandbox's "
                         f"{sandbox_kib} KiB ({need_kib} KiB in all)",
                         hint=f"request_disk = {math.ceil(need_kib / 1024)}MB or more (a job that writes much "
                              "needs more), or leave request_disk out for the image's default")
    return disklimit.DiskLimit(room, f"request_disk {request.disk_kib} KiB less the sandbox's {sandbox_kib} KiB")


def _env_names(environment: Any) -> tuple:
    if not isinstance(environment, str):
        return ()
    return tuple(re.findall(r"(?:^|\s|')([A-Za-z_][A-Za-z0-9_]*)=", environment))


class Chirp:
    """Updates the job ad from the execute side (needs WantIOProxy, set by the transform)."""

    def __init__(self, binary: Optional[str]):
        self.binary = binary

    @classmethod
    def find(cls, environ: Mapping[str, str]) -> "Chirp":
        if not Path(environ.get("_CONDOR_SCRATCH_DIR", "."), ".chirp.config").exists():
            return cls(None)
        candidates = [shutil.which("condor_chirp")] + list(CHIRP_PATHS)
        return cls(next((c for c in candidates if c and os.access(c, os.X_OK)), None))

    def set(self, name: str, value: Any) -> bool:
        if self.binary is None:
            return False
        if value is classad.UNDEFINED:
            expr = "undefined"
        else:           # chirp reads the old ClassAd syntax
            expr = classad.quote_old(value) if isinstance(value, str) else classad.quote(value)
        try:
            done = subprocess.run([self.binary, "set_job_attr", name, expr], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=60)
        except (OSError, ValueError, subprocess.TimeoutExpired):     # ValueError: a NUL in argv
            return False
        return done.returncode == 0


def sandbox_inputs(sandbox: Path) -> list:
    """(host path, guest relative path) for every file the job brought, at any depth."""
    pairs = []
    for dirpath, dirnames, filenames in os.walk(sandbox):
        rel_dir = Path(dirpath).relative_to(sandbox)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in STARTER_FILES]
            filenames = [f for f in filenames if f not in STARTER_FILES]
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                pairs.append((str(path), str(rel_dir / name)))
    return pairs


def guest_command(argv: list, sandbox: Path) -> list:
    """The sandbox is the guest work dir: an executable shipped in it runs from there."""
    exe = Path(argv[0])
    try:
        rel = (exe if exe.is_absolute() else (Path.cwd() / exe)).resolve().relative_to(sandbox.resolve())
        return ["./" + str(rel)] + list(argv[1:])
    except ValueError:
        return list(argv)


def _machine_ad(environ: Mapping[str, str]) -> Optional[classad.Ad]:
    path = environ.get("_CONDOR_MACHINE_AD")
    return classad.read_ad(Path(path)) if path and Path(path).exists() else None


def _machine_value(machine: Optional[classad.Ad], name: str) -> Any:
    try:
        return machine.evaluate(name) if machine is not None else None
    except classad.AdError:
        return None


def _worker_name(machine: Optional[classad.Ad]) -> str:
    """The slot's name (slot1@vm1@host), so a hold reason says which worker failed."""
    name = _machine_value(machine, "Name")
    return name if isinstance(name, str) and name else socket.gethostname()


def _machine_overrides(machine: Optional[classad.Ad]) -> dict:
    """The startd's probe advertises its cache dir: jobs of that startd use the same one; QEMU
    always joins the job's cgroups; warm states are root's shared ones only."""
    cache_dir = _machine_value(machine, "VMLoaderCacheDir")
    # A wrapper running as root (the system libvirtd) moves QEMU into the job's cgroup: the
    # slot's limits and accounting must cover the VM (qemucgroup.py).
    # A job never builds a warm state of its own: it would be saved inside the job's slot (its
    # memory and disk charged to the job's cgroup, 180+ MiB per shape, in a home that may be NFS
    # or tmpfs) for later jobs of the same user only. Jobs restore the states root builds in the
    # shared cache (`images warm` from a STARTD_CRON) and otherwise boot cold.
    overrides = {"qemu_cgroup": "caller", "warm_own_states": False}
    return dict(overrides, cache_dir=cache_dir) if isinstance(cache_dir, str) and cache_dir else overrides


def _private_libvirt(environ: dict) -> Optional[Path]:
    """Unprivileged jobs get their own libvirt session daemon: the starter kills everything the
    job started when it ends, so a daemon shared with another slot's job would take that job's
    VM down with it. Its qemu.conf keeps QEMU's core size at 0: the starter gives jobs a hard
    core limit of 0 (submit `coresize`), and libvirt's default of raising it to unlimited fails."""
    if os.geteuid() == 0:
        return None
    entry = pwd.getpwuid(os.geteuid())
    if not environ.get("HOME") or not Path(environ["HOME"]).is_dir():
        os.environ["HOME"] = entry.pw_dir
    # Not under TMPDIR (the sandbox): libvirt puts sockets in here, and their paths must stay short.
    runtime = Path(tempfile.mkdtemp(prefix="vml-", dir="/tmp"))
    (runtime / "config" / "libvirt").mkdir(parents=True)
    (runtime / "config" / "libvirt" / "qemu.conf").write_text("max_core = 0\n")
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    os.environ["XDG_CONFIG_HOME"] = str(runtime / "config")
    return runtime


def _end_private_libvirt(runtime: Path, grace: float = 10.0) -> None:
    """Stop the session daemons our connection started (their pid files are in our runtime dir),
    wait until they are gone (SIGKILL after `grace` seconds), then remove the dir: a daemon still
    exiting writes into it again (50 pool jobs left 14 empty runtime dirs behind before the wait)."""
    pids = []
    for pidfile in sorted((runtime / "libvirt").glob("*.pid")):
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + grace
    while (alive := [pid for pid in pids if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for _ in range(3):              # a last write of a dying daemon may race the first removal
        shutil.rmtree(runtime, ignore_errors=True)
        if not runtime.exists():
            break
        time.sleep(0.1)


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie awaiting its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def run_wrapper(argv: list, environ: Optional[dict] = None) -> int:
    environ = dict(os.environ if environ is None else environ)
    if not argv:
        print("vmloader condor wrapper: no job command given", file=sys.stderr)
        return EXIT_INFRA
    ad_path = environ.get("_CONDOR_JOB_AD")
    ad_text = Path(ad_path).read_text(errors="replace") if ad_path and Path(ad_path).exists() else ""
    if not classad.declares(ad_text, "VMImage") or sshtojob.is_sshd(
            argv, Path(environ.get("_CONDOR_SCRATCH_DIR") or os.getcwd())):
        os.execvp(argv[0], argv)      # not a VM job (or condor_ssh_to_job's sshd): run it exactly as before
    chirp = Chirp.find(environ)
    chirp.set(HOLD_ATTR, classad.UNDEFINED)       # a failure of an earlier run is history
    machine = _machine_ad(environ)
    worker = _worker_name(machine)
    runtime = sandbox = None
    try:
        request = vm_request(classad.parse_ad(ad_text), machine, cgroups.memory_limit_bytes())
        if request is None:     # declares() saw a VMImage line, yet the parsed ad lacks it
            raise JobAdError("the job ad has a VMImage line, but it is not in the ad as parsed",
                             hint="check the +VMImage line of the submit file")
        cfg = config_mod.load(overrides=_machine_overrides(machine))
        runtime = _private_libvirt(environ)
        sandbox = Path(environ.get("_CONDOR_SCRATCH_DIR") or os.getcwd())
        spec = _job_spec(request, argv, sandbox, environ, cfg)
        sshtojob.point(sandbox, cfg.jobs_dir / str(spec.job_id))    # for condor_ssh_to_job into the VM
        runner = runners.job_runner(cfg, boot_test=False, stdout=sys.stdout.buffer, stderr=sys.stderr.buffer)
        result = runner.run(spec)
    except VMLoaderError as exc:
        print(exc.user_text(), file=sys.stderr)
        if exc.exit_code == EXIT_INFRA:
            _hold(chirp, worker, exc.phase, exc.message, exc.hint)
        return exc.exit_code
    finally:
        if sandbox is not None:
            sshtojob.unpoint(sandbox)
        if runtime is not None:
            _end_private_libvirt(runtime)
    if result.snapshot:
        chirp.set(SNAPSHOT_ATTR, f"{worker}:{cfg.snapshots_dir / result.snapshot}")
    if result.error:
        print(VMLoaderError(result.error["message"], result.error["hint"], result.error["phase"]).user_text(),
              file=sys.stderr)
        if result.exit_status == EXIT_INFRA:
            _hold(chirp, worker, result.error["phase"], result.error["message"], result.error["hint"])
    return result.exit_status


def _job_spec(request: VMRequest, argv: list, sandbox: Path, environ: Mapping[str, str],
              cfg: config_mod.Config) -> JobSpec:
    env = {name: environ[name] for name in request.env_names if name in environ}
    guest_files: "tuple[GuestFile, ...]" = ()
    proxy = environ.get("X509_USER_PROXY")
    if proxy and Path(proxy).is_file():
        guest_files = (GuestFile(proxy, "/etc/grid-security/x509_proxy", 0o644),)
        env["X509_USER_PROXY"] = "/etc/grid-security/x509_proxy"
    env["_CONDOR_JOB_LABEL"] = request.label
    inputs = sandbox_inputs(sandbox)
    limit = disk_limit(request, sum(disklimit.allocated(Path(host)) for host, _ in inputs))
    return JobSpec(
        image=request.image, command=tuple(guest_command(argv, sandbox)), cpus=request.cpus,
        memory_mib=request.memory_mib, root=request.root, timeout=request.timeout, env=env,
        inputs=tuple(inputs), outputs=request.outputs or (), disk_limit=limit,
        output_dir=sandbox, collect_new=request.outputs is None, guest_files=guest_files,
        snapshot=request.snapshot or cfg.snapshot_policy, tb_cache_mib=domain.SLOT_TB_CACHE_MIB,
        job_id=f"condor-{request.label}-{os.urandom(3).hex()}")


# The hold reason's ClassAd literal (old syntax, as chirp sends it), quotes included. condor_chirp
# formats its whole command ("set_job_attr NAME VALUE") into a 1024-byte buffer: a longer one
# crashes it and the hold is lost.
HOLD_REASON_MAX = 512
_HOLD_HEAD_MAX, _HOLD_HINT_MAX, _CUT = 120, 160, "..."


def hold_reason(worker: str, phase: Optional[str], message: str, hint: Optional[str]) -> str:
    """The reason a job is held: one line whose ClassAd literal takes at most HOLD_REASON_MAX bytes.

    The message (and anything else) may carry guest text: every control or format character
    (ESC, CR, NUL, C1, bidi overrides) becomes a visible escape, so `condor_q -hold` shows it
    as data and chirp's argv never holds a NUL. Backslashes stay single: text escaped where it
    entered a message is not escaped twice."""
    head = _fit(_units(f"vmloader on {worker}" + (f" [{phase}]" if phase else "") + ": "), _HOLD_HEAD_MAX)
    tail = _fit(_units(f" (hint: {hint})"), _HOLD_HINT_MAX) if hint else ""
    room = HOLD_REASON_MAX - 3 - _quoted_size(head) - _quoted_size(tail)    # quotes; a space after a last `\\`
    return head + _fit(_units(message), room) + tail


def _units(text: str) -> list:
    """Each character as it is shown: itself, or its escape (never cut in the middle)."""
    return [char if char == "\\" else escape(char) for char in text]


def _quoted_size(text: str) -> int:
    return len(classad.quote_old(text).encode("utf-8")) - 2


def _fit(units: list, budget: int) -> str:
    """The units joined, cut (ending in "...") so that their quoted form takes at most `budget` bytes."""
    text = "".join(units)
    if _quoted_size(text) <= budget:
        return text
    kept, used = [], len(_CUT)
    for unit in units:
        used += _quoted_size(unit)
        if used > budget:
            break
        kept.append(unit)
    return "".join(kept) + _CUT


def _hold(chirp: Chirp, worker: str, phase: Optional[str], message: str, hint: Optional[str]) -> None:
    reason = hold_reason(worker, phase, message, hint)
    if not chirp.set(HOLD_ATTR, reason):
        print("vmloader: could not put the job on hold (no chirp: is the VMLoader job transform "
              "configured on the schedd?)", file=sys.stderr)


def probe_lines(cfg: config_mod.Config) -> list:
    """STARTD_CRON output: what this worker can offer VM jobs."""
    from .. import __version__
    found = hypervisors.detect(hypervisors.HostProbes())
    usable = [h.name for h in found if h.usable]
    cache = ImageCache.configured(cfg)
    try:
        entries = cache.cached_entries()
    except (VMLoaderError, OSError):
        entries = {}
    cached = sorted(entries)
    try:
        warmed = warm.shared_warm_images(cfg, entries) if cfg.warm_start else []
    except (VMLoaderError, OSError):
        warmed = []
    try:
        free = shutil.disk_usage(cfg.cache_dir if cfg.cache_dir.exists() else cfg.cache_dir.parent).free
    except OSError:
        free = 0
    return [
        "VMLoader = true",
        f"VMLoaderVersion = {classad.quote(__version__)}",
        f"VMLoaderHypervisors = {classad.quote(','.join(usable))}",
        f"VMLoaderImages = {classad.quote(','.join(cached))}",
        f"VMLoaderWarmImages = {classad.quote(','.join(warmed))}",
        f"VMLoaderCacheDir = {classad.quote(str(cfg.cache_dir))}",
        f"VMLoaderCacheFreeBytes = {free}",
    ]

"""One VM per job: resolve the image, boot a throwaway overlay, run the command
through the agent, collect outputs, keep or drop the disk state, tear down.

Whatever fails, the finally-path runs: the domain is destroyed, the overlay
is either preserved as a snapshot or deleted, and the job record (metadata +
console log) stays in the job directory.
"""
import errno
import io
import json
import os
import pwd
import re
import secrets
import socket
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Mapping, Optional, TypeVar

from .. import protocol as P
from . import (bootmode, cgroups, cidata, delivery, diskfull, disklimit, firmware, guesttext, launch, privatefiles,
               proc, qemucgroup, sandboxnames, stopsignals, virt, warm)
from .agentclient import AgentClient, ByteSink, ExecResult, ExecTimeout, guest_text
from .cache import ImageCache, ResolvedImage
from .console import ConsoleFollower, crash_line, failure_tail
from .config import Config
from .deliverymemory import DELIVERIES_DIR, DeliveryMemory
from .domain import (QGA_CHANNEL, BootSpec, ChannelSpec, ConsoleSpec, DiskSpec, DomainSpec, JobMetadata,
                     NetworkSpec, domain_xml, machine_type)
from .errors import (EXIT_INFRA, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, EXIT_TIMEOUT, AgentError,
                     GuestTimeout, ImageError, Interrupted, JobCommandNotExecutable, JobCommandNotFound, Reported,
                     SnapshotError, UsageError, VMLoaderError)
from .hypervisors import Hypervisor
from .launch import LaunchPlan
from .repository import is_url, url_image
from .snapshots import Retention, Snapshot, SnapshotMeta, SnapshotStore, check_chain, should_keep
from .timings import PhaseTimer
from .warm import Lane, WarmUnusable

GUEST_WORKDIR = "/work"
GUEST_USER = "vmloader"
TAIL_BYTES = 64 * 1024

T = TypeVar("T")


@dataclass(frozen=True)
class GuestFile:
    """A host file placed at an absolute guest path, owned by root (credentials)."""
    host_path: str
    guest_path: str
    mode: int = 0o644


@dataclass(frozen=True)
class JobSpec:
    image: str
    command: tuple
    image_sha256: Optional[str] = None     # for --image https://...: the disk's expected sha256
    cpus: Optional[int] = None
    memory_mib: Optional[int] = None
    root: bool = False
    timeout: Optional[float] = None
    env: Mapping[str, str] = field(default_factory=dict)
    inputs: tuple = ()             # host paths (land by base name) or (host path, guest relative path)
    outputs: tuple = ()
    output_dir: Path = Path(".")
    collect_new: bool = False      # also copy back every top-level file the command created or changed
    guest_files: tuple = ()        # GuestFile: credentials and such, placed as root before the command
    snapshot: str = "on-failure"
    from_snapshot: Optional[str] = None   # boot this kept state (on a throwaway overlay) instead of the image
    network: str = "user"
    console: bool = False
    console_raw: bool = False      # --console --raw: the console's bytes unescaped
    capture_dir: bool = False      # --json: command output goes to files in the job dir
    job_id: Optional[str] = None
    cold: bool = False             # --cold: boot the image even when a warm state could be restored
    disk_limit: Optional[disklimit.DiskLimit] = None   # the overlay's bound (HTCondor's request_disk)
    tb_cache_mib: Optional[int] = None     # TCG's translation cache (None: the config's tcg_tb_cache_mib)


@dataclass
class JobResult:
    job_id: str
    exit_status: int
    outcome: str
    image: str = ""
    hypervisor: str = ""
    timings: dict = field(default_factory=dict)
    snapshot: Optional[str] = None
    job_dir: str = ""
    console_log: str = ""
    stdout_path: Optional[str] = None
    stderr_path: Optional[str] = None
    error: Optional[dict] = None
    output_errors: list = field(default_factory=list)   # outputs that could not be copied back, and why
    start: str = ""                # "warm": restored from a warm state; "cold": booted
    agent_delivery: Optional[str] = None   # how the agent was reached: builtin, qemu-guest-agent, cloud-init
    agent_delivery_remembered: bool = False  # ... the way remembered for the image, the others not probed

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def exit_status(result: ExecResult) -> int:
    """docker-run conventions: own code; 128+N for signal N; 126/127; 125 for ours."""
    if result.error == "not_found":
        return EXIT_NOT_FOUND
    if result.error == "not_executable":
        return EXIT_NOT_EXECUTABLE
    if result.error:
        return EXIT_INFRA
    if result.signal:
        return 128 + result.signal
    return result.exit_code if result.exit_code is not None else EXIT_INFRA


def outcome_of(status: int) -> str:
    return {0: "succeeded", EXIT_TIMEOUT: "timeout", EXIT_INFRA: "infrastructure-error",
            EXIT_NOT_EXECUTABLE: "not-executable", EXIT_NOT_FOUND: "not-found"}.get(
        status, "killed-by-signal" if status > 128 else "failed")


def validate(spec: JobSpec) -> None:
    if not spec.command:
        raise UsageError("no command given", hint="vmloader run --image NAME -- COMMAND [ARGS...]")
    for path, guest in input_pairs(spec):
        if not Path(path).is_file():
            raise UsageError(f"--input {path}: no such file", hint="give an existing file to copy into the guest")
        pure = PurePosixPath(guest)
        if pure.is_absolute() or ".." in pure.parts or not pure.parts:
            raise UsageError(f"input {guest}: path escapes the job's work dir")
    for out in spec.outputs:
        pure = PurePosixPath(out)
        if pure.is_absolute() or ".." in pure.parts or not pure.parts:
            raise UsageError(f"--output {out}: path escapes the job's work dir",
                             hint=f"give a path relative to the guest work dir {GUEST_WORKDIR}, without '..'")
    if spec.timeout is not None and spec.timeout <= 0:
        raise UsageError("--timeout must be positive")


def input_pairs(spec: JobSpec) -> list:
    return [(str(item), Path(item).name) if isinstance(item, (str, Path)) else (str(item[0]), str(item[1]))
            for item in spec.inputs]


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class TailWriter:
    """Passes output through and remembers its last bytes for the job record."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.last = bytearray()

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.last += data
        del self.last[:-TAIL_BYTES]
        return len(data)

    def flush(self) -> None:
        self.out.flush()


@dataclass
class Attached:
    """What a session gets once the guest's agent answers: the client and the job's
    identity in the guest (the default session runs the job's command; `snapshot shell`
    and `snapshot boot` bring their own)."""
    client: AgentClient
    env: dict
    user: str
    cwd: str
    job_id: str
    sockets: tuple = ()          # agent sockets another client may attach to


Session = Callable[[Attached, ByteSink, ByteSink], ExecResult]


class Job:
    """The state of one running job; `JobRunner.run` drives it through its phases."""

    def __init__(self, spec: JobSpec, job_dir: Path):
        self.spec = spec
        self.job_dir = job_dir
        self.timer = PhaseTimer(on_enter=self._record_phase)
        self.image: Optional[ResolvedImage] = None
        self.hypervisor: Optional[Hypervisor] = None
        self.plan: Optional[LaunchPlan] = None  # what is brought to life, decided before anything starts
        self.machines: Optional[virt.Machines] = None
        self.qemu_placement: Optional[qemucgroup.Placement] = None   # the cgroups QEMU is moved into
        self.machine: Optional[virt.Machine] = None
        self.client: Optional[AgentClient] = None
        self.watch: Optional[disklimit.OverlayWatch] = None
        self.oom_kills = cgroups.oom_kills()    # the job's memory cgroup's count before its VM started
        self.exec_started = False
        self.before: Optional[dict] = None      # work dir files after stage-in (collect_new)
        self.pins = ExitStack()                 # entered by JobRunner.run, closed after teardown
        self.status = EXIT_INFRA
        self.error: Optional[Reported] = None
        self.keep_memory = False                # a timeout leaves the command running: save the VM's memory
        self.output_errors: list = []
        self.agent_delivery: Optional[str] = None   # delivery.BUILTIN, QEMU_GUEST_AGENT, ...
        self.agent_delivery_remembered = False
        self.borrowed: Optional[warm.BorrowedLane] = None   # root's warm lane this user's job restores

    def _record_phase(self, name: str) -> None:
        """For `vmloader status`; never worth failing a job (or its teardown) over."""
        try:
            privatefiles.write_private(self.job_dir / "phase", name + "\n")
        except OSError:
            pass

    @property
    def overlay(self) -> Path:
        return self.job_dir / "overlay.qcow2"

    @property
    def console_log(self) -> Path:
        return self.job_dir / "console.log"

    @property
    def socket_path(self) -> Path:
        return self.job_dir / "agent.sock"

    @property
    def attach_sockets(self) -> tuple:
        return tuple(self.job_dir / f"attach-{n}.sock" for n in range(1, P.ATTACH_PORTS + 1))

    @property
    def qga_socket(self) -> Path:
        return self.job_dir / "qga.sock"

    @property
    def seed(self) -> Path:
        return self.job_dir / "cidata.img"

    @property
    def nvram(self) -> Path:
        return self.job_dir / "uefi-vars.fd"

    @property
    def memory_state(self) -> Path:
        return self.job_dir / "memory.save"

    @property
    def kept(self):
        """The Snapshot brought back, if the plan brings one back."""
        return self.plan.kept if self.plan is not None else None

    @property
    def start(self) -> str:
        """How its VM came to life: "warm" (restored), "cold" (booted), "" (it never did)."""
        if self.plan is None or self.machine is None:
            return ""
        return "warm" if self.plan.warm else "cold"

    @property
    def domain_name(self) -> str:
        if self.plan is None:
            return f"vmloader-{self.job_dir.name}"
        return self.plan.domain_name(self.job_dir)


ATTACH_INFO = "attach.json"     # in the job dir while the command runs: how to attach beside it


def _write_attach_info(job: Job, attached: Attached) -> None:
    """Who the command runs as and where, for a shell attached beside it (`vmloader condor ssh-to-job`)."""
    info = {"pid": os.getpid(), "job_id": attached.job_id, "user": attached.user, "cwd": attached.cwd,
            "env": attached.env, "sockets": list(attached.sockets)}
    diskfull.best_effort("the attach info", privatefiles.write_private, job.job_dir / ATTACH_INFO,
                         json.dumps(info))


class JobRunner:
    def __init__(self, config: Config, cache: ImageCache, store: SnapshotStore,
                 choose_hypervisor: Callable[[], Hypervisor], *, stdin: Optional[BinaryIO] = None,
                 stdout: Optional[BinaryIO] = None, stderr: Optional[BinaryIO] = None,
                 session: Optional[Session] = None, connect: virt.Connect = virt.LibvirtMachines,
                 host_cgroups: Optional[qemucgroup.HostCgroups] = None):
        self.session = session
        self.connect = connect
        self.host_cgroups = host_cgroups or qemucgroup.HostCgroups()
        self.config = config
        self.cache = cache
        self.store = store
        self.choose_hypervisor = choose_hypervisor
        self.stdin = stdin
        self.stdout = stdout if stdout is not None else sys.stdout.buffer
        self.stderr = stderr if stderr is not None else sys.stderr.buffer

    def run(self, spec: JobSpec) -> JobResult:
        validate(spec)
        job_id = spec.job_id or new_job_id()
        job = Job(spec, self._make_job_dir(job_id))
        _write_owner(job)
        out, err = self._output_streams(job)
        with job.pins:                          # released after teardown: the base is in use until then
            try:
                self._boot_and_exec(job, out, err)
            except ExecTimeout:
                job.status = EXIT_TIMEOUT
            except Interrupted as stop:     # condor_rm, preemption, Ctrl-C (its phase: timings.py)
                job.error, job.status = stop, stop.exit_code
            except VMLoaderError as exc:
                if job.watch is not None and job.watch.breach is not None:
                    exc = job.watch.breach          # what made the guest stop answering
                exc.phase = exc.phase or job.timer.current
                job.error, job.status = exc, exc.exit_code
            except OSError as exc:          # e.g. the job dir's disk filled up under the command's output
                job.error, job.status = diskfull.host_write_error(exc, job.timer.current, job.job_dir), EXIT_INFRA
            finally:
                with stopsignals.held():    # the VM stopped, its state kept: a stop signal waits for that
                    snapshot_id = self._finish(job)
                    diskfull.best_effort("the output tails", self._write_tails, job, out, err)
        self._prune_snapshots()
        return self._result(job, job_id, snapshot_id)

    def _prune_snapshots(self) -> None:
        """Retention after every job, so a worker's snapshot store never grows without bound."""
        c = self.config
        try:
            pruned = self.store.prune(Retention(c.snapshot_max_count, c.snapshot_max_bytes, c.snapshot_max_age_days))
        except (OSError, VMLoaderError) as exc:
            print(f"vmloader: could not prune old snapshots: {exc}", file=sys.stderr)
            return
        for snap, reason in pruned:
            print(f"vmloader: pruned snapshot {snap.meta.id} ({reason})", file=sys.stderr)

    def _make_job_dir(self, job_id: str) -> Path:
        """The job's own directory, private to its user (and searchable by QEMU's group as root)."""
        access = privatefiles.current()
        for path, what in ((self.config.state_dir, "state directory"), (self.config.jobs_dir, "job records directory"),
                           (self.store.root, "snapshot store")):       # an older, wider one is tightened
            privatefiles.private_dir(path, access, what, parents=True)
        job_dir = self.config.jobs_dir / job_id
        privatefiles.check_traversable(job_dir, access)
        try:
            job_dir.mkdir(mode=0o700)
        except FileExistsError:
            raise UsageError(f"job id {job_id} was already used on this worker ({job_dir})",
                             hint="give a new --job-id or leave it out", phase="setup") from None
        return privatefiles.private_dir(job_dir, access, "job directory")

    def _output_streams(self, job: Job):
        if job.spec.capture_dir:
            return (TailWriter(open(privatefiles.open_private(job.job_dir / "stdout"), "wb")),
                    TailWriter(open(privatefiles.open_private(job.job_dir / "stderr"), "wb")))
        return TailWriter(self.stdout), TailWriter(self.stderr)

    def _boot_and_exec(self, job: Job, out: TailWriter, err: TailWriter) -> None:
        spec = job.spec
        # Each phase's result is kept on the job (for teardown) and in a local (set from here on).
        with job.timer.phase("cache lookup"):
            plan = job.plan = self._plan(job)
            if plan.restores_memory:
                _write_owner(job)              # a later vmloader must find the VM by its saved name
            image = job.image = self._resolve(job, plan.image_ref)
            job.pins.enter_context(self.cache.pin(image))
            if not self.cache.has_all(image.entry):     # evicted between lookup and pin
                image = job.image = self.cache.resolve(plan.image_ref)
        with job.timer.phase("hypervisor"):
            hypervisor = job.hypervisor = self.choose_hypervisor()
        with job.timer.phase("define"):
            machines = job.machines = self._connect(job, self.config.libvirt_uri or hypervisor.uri)
        _refuse_unbootable(image)
        if self._may_start_warm(job, image, hypervisor):
            plan = job.plan = self._warm_plan(job, plan, image, hypervisor, machines)
        follower = ConsoleFollower(job.console_log, self.stderr, spec.console_raw).start() if spec.console else None
        try:
            while True:                             # root's borrowed state, the user's own, cold
                try:
                    client = self._bring_up(job, plan, image, hypervisor)
                    break
                except WarmUnusable as why:
                    if plan.lane is None:
                        raise
                    borrowed = plan.lane.borrowed
                    self._abandon_warm(job, image, why)
                    plan = job.plan = launch.cold_image(plan.image_ref)
                    if borrowed:                    # root's state failed here: the user's own way
                        plan = job.plan = self._warm_plan(job, plan, image, hypervisor, machines, borrow=False)
                    _write_owner(job)
            self._watch_disk(job)                   # (a boot writes little: watched from here on)
            with job.timer.phase("stage-in"):
                self._stage_in(job, image, client)
            with job.timer.phase("exec"):
                job.exec_started = True
                try:
                    attached = Attached(client, self._guest_env(job, image), self._guest_user(job), GUEST_WORKDIR,
                                        job.job_dir.name, tuple(str(p) for p in job.attach_sockets))
                    _write_attach_info(job, attached)
                    result = (self.session or self._run_command(job, hypervisor))(attached, out, err)
                except ExecTimeout:
                    raise
                except AgentError as exc:
                    raise self._explain_guest_death(job, exc) from None
            if job.watch is not None and job.watch.check():
                raise _known(job.watch.breach, "disk limit breach")
            job.status = exit_status(result)
            _raise_for_spawn_error(result)
        finally:
            if follower:
                follower.stop()

    def _connect(self, job: Job, uri: str) -> virt.Machines:
        """The hypervisor connection; as root against the system libvirtd (with qemu_cgroup = "caller"),
        one whose VMs start paused and join this process's cgroups before they run."""
        machines = self.connect(uri)
        placement = job.qemu_placement = qemucgroup.placement_for(self.config.qemu_cgroup, uri, self.host_cgroups)
        return machines if placement is None else qemucgroup.AccountedMachines(machines, placement)

    def _bring_up(self, job: Job, plan: LaunchPlan, image: ResolvedImage, hypervisor: Hypervisor) -> AgentClient:
        """Overlay, VM, agent, identity: the job's VM ready for its command."""
        if image.firmware_boot == "uefi":
            firmware.ovmf()                  # no firmware on this worker: say so before making any file
        with job.timer.phase("overlay"):
            if job.kept is not None:
                check_chain(job.kept, image.disk, phase="overlay")
            try:
                _private_overlay(plan.overlay_backing(image.disk), job.overlay, "overlay")
            except VMLoaderError as err:
                if plan.lane is None:
                    raise
                # The lane's disk layer went away (or is unreadable) since it was checked: a warm
                # state problem, not the job's; the cold boot says so if the job dir is the cause.
                why = ("its disk layer was removed after it was checked" if not plan.lane.disk.exists()
                       else f"its disk layer cannot be used: {err.message}")
                raise WarmUnusable(why, phase="overlay") from None
        spec = self._domain_spec(job, plan, image, hypervisor)
        if plan.warm:
            with job.timer.phase("restore"):
                try:
                    with stopsignals.held():        # a VM started is one the teardown knows of
                        job.machine = launch.start(plan, _known(job.machines, "machines"), spec,
                                                   job.job_dir / "domain.xml")
                finally:
                    if job.borrowed is not None:
                        job.borrowed.restored()       # QEMU holds root's files now: root may drop them
            with job.timer.phase("boot"):             # (restored: until its agent answers again)
                try:
                    client = job.client = self._connect_agent(job, timeout=warm.AGENT_SILENCE, resumed=True)
                except VMLoaderError:
                    raise WarmUnusable(f"its agent did not answer within {warm.AGENT_SILENCE:.0f} s "
                                       "after restore") from None
        else:
            with job.timer.phase("define"), stopsignals.held():     # (as above)
                job.machine = launch.start(plan, _known(job.machines, "machines"), spec, job.job_dir / "domain.xml")
            with job.timer.phase("boot"):
                client = job.client = self._connect_agent(job, resumed=plan.restores_memory)
        with job.timer.phase("identity"):
            self._personalize(job, client, plan.warm)
        return client

    def _personalize(self, job: Job, client: AgentClient, warm_started: bool) -> None:
        """Each job its own machine: fresh entropy, hostname, machine-id, the host's clock (a restored
        guest is a clone of the one saved; a cold one gets the same, one code path)."""
        if not client.supports("identity"):
            if warm_started:
                raise WarmUnusable("its agent is too old to take a new identity")
            return
        try:
            client.identity(secrets.token_bytes(64), _hostname(job), uuid.uuid4().hex, time.time_ns())
        except AgentError as exc:
            if warm_started:
                raise WarmUnusable(f"the guest could not take a new identity: {exc.message}") from None
            raise

    def _may_start_warm(self, job: Job, image: ResolvedImage, hypervisor: Hypervisor) -> bool:
        """Warm unless told not to, or the job is not a fresh boot of our image under QEMU. A job that
        may be frozen with its memory on timeout boots cold: a state saved from a lane keeps the
        lane's name and uuid, and resuming it later would collide with the lane. A VM moved into the
        job's cgroups boots cold too: the memory a restore loads stays charged to libvirt's cgroup."""
        spec = job.spec
        return (self.config.warm_start and not spec.cold and job.plan is not None and job.plan.kind == launch.COLD_IMAGE
                and job.qemu_placement is None
                and hypervisor.domain_type in ("kvm", "qemu") and _warmable(image)
                and not (spec.timeout is not None and should_keep(spec.snapshot, True)))

    def _warm_parts(self, job: Job, image: ResolvedImage, hypervisor: Hypervisor, machines: virt.Machines) -> dict:
        """Everything that makes restoring a saved state unsafe when it changes: the state's key."""
        entry, spec = image.entry, job.spec
        return {"image": {kind: art.sha256 for kind, art in sorted(entry.artifacts.items())},
                "image_sha256": entry.artifacts["disk"].sha256, "agent": warm.agent_version(),
                "cpus": spec.cpus or entry.cpus or self.config.cpus,
                "memory_mib": spec.memory_mib or entry.memory_mib or self.config.memory_mib,
                "network": spec.network, "cmdline": _cmdline(image, spec.network, None),
                **({"firmware": image.firmware_boot} if image.firmware_boot else {}),
                "qemu": warm.qemu_version(), "machine": machine_type(direct_kernel=image.kernel is not None),
                "domain_type": hypervisor.domain_type,
                "naming": warm.NAMING, **machines.host_identity()}

    def _borrow(self, job: Job, parts: dict, hypervisor: Hypervisor) -> Optional[Lane]:
        """A lane of root's shared warm state for an unprivileged user's job (read-only), or None."""
        root = warm.shared_root(self.config)
        if root is None or self.config.libvirt_uri:
            return None
        roots = dict(parts, uri=virt.default_uri(hypervisor.domain_type, 0))    # as root saved it
        held = warm.SharedWarm(root, warm.daemon_lock_dir(self.config),
                               self.config.own_cache_dir / "warm" / "refused").borrow(warm.state_key(roots))
        if held is None:
            return None
        job.pins.enter_context(held)                # released after teardown (the share: after restore)
        job.borrowed = held
        return held.lane

    def _warm_plan(self, job: Job, plan: LaunchPlan, image: ResolvedImage, hypervisor: Hypervisor,
                   machines: virt.Machines, borrow: bool = True) -> LaunchPlan:
        """A lane of this image's warm state for the job (root's shared one for a user, if any;
        else the user's own, built first if need be), or `plan` (cold)."""
        try:
            parts = self._warm_parts(job, image, hypervisor, machines)
            borrowed = self._borrow(job, parts, hypervisor) if borrow else None
            if borrowed is not None:
                warm_plan = job.plan = launch.warm_state(plan.image_ref, borrowed)
                _write_owner(job)
                return warm_plan
            if not self.config.warm_own_states:
                return plan                         # (an HTCondor job: see condor._machine_overrides)
            store = warm.own_store(self.config, self.config.warm_lanes or warm.default_lanes())
            held = store.acquire(warm.state_key(parts))
            if held is None:
                return plan                         # every lane busy and no room for another: cold
            job.pins.enter_context(held)            # the lane is this job's until teardown ends
            lane = held.lane
            if lane.complete():
                try:
                    lane.check()
                except WarmUnusable as why:
                    _say_unusable(image, why)
                    lane.drop()
                    return plan
            else:
                key = lane.key
                no_room = store.no_room(key)
                if no_room is not None:
                    print(f"vmloader: no room for a warm state of {image.entry.ref} in {store.root} ({no_room}); "
                          "booting cold", file=sys.stderr)
                    return plan
                free = store.free_bytes(key)
                with job.timer.phase("warm build"):
                    failed = self._build_lane(job, lane, parts, image, hypervisor, machines)
                if failed is not None:
                    if os.strerror(errno.ENOSPC) in failed:       # (libvirt and OSError both say so)
                        diskfull.best_effort("the note of a full disk", store.note_no_room, key, free)
                    return plan
            lane.touch()
        except GuestTimeout:
            raise
        except (OSError, VMLoaderError) as exc:
            print(f"vmloader: cannot use warm states ({getattr(exc, 'message', exc)}); booting cold",
                  file=sys.stderr)
            return plan
        warm_plan = launch.warm_state(plan.image_ref, lane)
        job.plan = warm_plan
        _write_owner(job)                           # a later vmloader must find the VM by its lane name
        return warm_plan

    def _build_lane(self, job: Job, lane: Lane, parts: dict, image: ResolvedImage, hypervisor: Hypervisor,
                    machines: virt.Machines) -> Optional[str]:
        """Boot the clean image on the lane's disk to agent-ready, quiesce, save with memory, mark
        complete: None. Else why not (and nothing left behind): the job then boots cold."""
        machine = None
        built = False
        _write_owner(job, lane.domain_name)         # killed mid-build, a later vmloader finds the build's VM
        try:
            _private_overlay(image.disk, lane.disk, "warm build")
            spec = self._domain_spec(job, launch.cold_image(image.entry.ref), image, hypervisor, build=lane)
            with stopsignals.held():                # (a VM started is one the cleanup below knows of)
                machine = machines.create(domain_xml(spec))
            try:
                client = self._connect_agent(job)
            except GuestTimeout:
                # The clean image does not boot: a cold boot would fail the same way, and the
                # job's error is this one (its console tail included), not a warm-state problem.
                machine.destroy()
                machine = None
                diskfull.best_effort("the unfinished warm state", lane.drop)
                raise
            try:
                sink = io.BytesIO()
                client.exec(["/bin/sh", "-c", warm.QUIESCE], env={}, user="root", cwd="/", stdin=None,
                            stdout=sink, stderr=sink)
                partial = lane.dir / "memory.save.tmp"
                try:
                    machine.save(partial)
                except VMLoaderError:
                    partial.unlink(missing_ok=True)
                    raise
            finally:
                client.close()
            machine = None                          # saved: it no longer runs
            privatefiles.restrict(partial)
            os.rename(partial, lane.memory)
            lane.reclaim()
            lane.commit(parts, image.entry.ref)
            built = True
            return None
        except GuestTimeout:
            raise
        except (OSError, VMLoaderError, Interrupted) as exc:
            if machine is not None:
                machine.destroy()
            diskfull.best_effort("the partial warm state", lane.drop)
            if isinstance(exc, Interrupted):
                raise                               # the job ends here: no cold boot after it
            why = str(getattr(exc, 'message', exc))
            print(f"vmloader: could not save a warm state for {image.entry.ref} ({why}); this job boots cold",
                  file=sys.stderr)
            return why
        finally:
            if not built:                           # the job goes on (or fails) as its own VM
                diskfull.best_effort("the job's owner record", _write_owner, job)

    def _abandon_warm(self, job: Job, image: ResolvedImage, why: WarmUnusable) -> None:
        """The warm state failed this job after all: stop what runs, drop the state (a borrowed one:
        remember not to borrow it again); the caller boots its own way."""
        lane = _known(job.plan, "plan").lane
        if lane is not None and lane.borrowed:
            print(f"vmloader: the shared warm state for {image.entry.ref} is unusable here ({why.message}); "
                  "this job goes its own way", file=sys.stderr)
            if job.borrowed is not None:
                diskfull.best_effort("the refused warm state's note", warm.SharedWarm.refuse,
                                     self.config.own_cache_dir / "warm" / "refused", lane)
                job.borrowed.close()
                job.borrowed = None
        else:
            _say_unusable(image, why)
        if job.client is not None:
            job.client.close()
            job.client = None
        if job.machine is not None:
            job.machine.destroy()
            job.machine = None
        job.overlay.unlink(missing_ok=True)
        if lane is not None:
            diskfull.best_effort("the unusable warm state", lane.drop)

    def _watch_disk(self, job: Job) -> None:
        """Past its disk limit the VM is paused at once and the command's wait ends."""
        limit = job.spec.disk_limit
        if limit is None:
            return

        def stop_writing(used: int) -> None:
            if job.machine is not None:
                job.machine.pause()
            if job.client is not None:
                job.client.abort(f"the job's disk limit was reached ({used // disklimit.MIB} MiB written)")
        job.watch = disklimit.OverlayWatch(job.overlay, limit, stop_writing).start()

    def _plan(self, job: Job) -> LaunchPlan:
        spec = job.spec
        if spec.from_snapshot:
            kept = self.store.get(spec.from_snapshot)
            plan = launch.kept_state(kept)
            job.pins.enter_context(self.store.hold(kept.meta.id))    # never pruned while booted
            return plan
        ref = url_image(spec.image, spec.image_sha256, self.cache).ref if is_url(spec.image) else spec.image
        return launch.cold_image(ref)

    def _resolve(self, job: Job, ref: str) -> ResolvedImage:
        try:
            return self.cache.resolve(ref)
        except VMLoaderError as exc:
            if job.kept is None:
                raise
            meta = job.kept.meta
            raise SnapshotError(
                f"snapshot {meta.id} needs its base image {meta.image} (disk sha256 {meta.image_sha256}), "
                f"which is no longer in the cache and could not be fetched again: {exc.message}",
                hint=f"bring a repository offering {meta.image} back (or `vmloader images pull {meta.image}` "
                     "from one); the snapshot alone holds only what the job changed, and it is kept",
                phase="cache lookup") from None

    def _run_command(self, job: Job, hypervisor: Hypervisor) -> Session:
        spec = job.spec

        def run(attached: Attached, out: ByteSink, err: ByteSink) -> ExecResult:
            # A timed-out job whose state is kept keeps its memory too: the command is left
            # running and the VM saved, so `snapshot boot` resumes it at that moment.
            job.keep_memory = (spec.timeout is not None and should_keep(spec.snapshot, True)
                               and hypervisor.domain_type in ("kvm", "qemu"))
            return attached.client.exec(
                list(spec.command), env=attached.env, user=attached.user, cwd=attached.cwd,
                stdin=self.stdin, stdout=out, stderr=err, kill_on_timeout=not job.keep_memory,
                deadline=time.monotonic() + spec.timeout if spec.timeout else None)
        return run

    def _stage_in(self, job: Job, image: ResolvedImage, client: AgentClient) -> None:
        creds = host_credentials(self.config, image.entry.name, _user_name())
        for item in creds + list(job.spec.guest_files):
            client.put_file(item.host_path, item.guest_path, mode=item.mode, user="root")
        for path, guest in input_pairs(job.spec):
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            client.put_file(path, guest, mode=mode, user=self._guest_user(job))
        if job.spec.collect_new:
            job.before = _file_stamps(client.list_dir(GUEST_WORKDIR))

    def _guest_user(self, job: Job) -> str:
        return "root" if job.spec.root else GUEST_USER

    def _guest_env(self, job: Job, image: ResolvedImage) -> dict:
        env = {"VMLOADER_JOB_ID": job.job_dir.name, "VMLOADER_IMAGE": image.entry.ref}
        env.update(job.spec.env)
        return env

    def _domain_spec(self, job: Job, plan: LaunchPlan, image: ResolvedImage, hypervisor: Hypervisor,
                     build: Optional[Lane] = None) -> DomainSpec:
        """The job's VM; with `build`, the VM a warm state is saved from (no per-job parts: those come
        with the identity request after restore)."""
        entry, spec = image.entry, job.spec
        own_boot = image.firmware_boot is not None
        cmdline = _cmdline(image, spec.network, None if build is not None else _hostname(job))
        disks: tuple = ((DiskSpec(str(build.disk), backing=str(image.disk)),) if build is not None else
                        (DiskSpec(str(job.overlay), backing=str(image.disk), middle=plan.middle_layers()),))
        if own_boot:           # cloud-init's way in: a per-job NoCloud seed
            cidata.make_seed(job.seed, job.job_dir.name, _hostname(job))
            disks += (DiskSpec(str(job.seed), target="vdb", fmt="raw", readonly=True),)
        return DomainSpec(
            name=build.domain_name if build is not None else job.domain_name, hypervisor=hypervisor.domain_type,
            memory_mib=spec.memory_mib or entry.memory_mib or self.config.memory_mib,
            vcpus=spec.cpus or entry.cpus or self.config.cpus,
            boot=_boot_spec(image, cmdline, job.nvram, job.kept),
            disks=disks, smbios_serial=cidata.SMBIOS_SERIAL if own_boot else None,
            channel=ChannelSpec(str(job.socket_path)),
            attach_channels=tuple(ChannelSpec(str(path), name=f"{P.CHANNEL_PREFIX}{n}")
                                  for n, path in enumerate(job.attach_sockets, 1)),
            qga_channel=ChannelSpec(str(job.qga_socket), name=QGA_CHANNEL) if own_boot else None,
            console=ConsoleSpec(str(job.console_log)),
            network=NetworkSpec(spec.network, isolated_nic=own_boot),
            tb_cache_mib=spec.tb_cache_mib or self.config.tcg_tb_cache_mib,
            metadata=JobMetadata(job.job_dir.name, _user_name(), entry.ref,
                                 entry.artifacts["disk"].sha256, os.getpid()))

    def _connect_agent(self, job: Job, timeout: Optional[float] = None, resumed: bool = False) -> AgentClient:
        """The agent of the job's VM, delivered first if a stock image needs it. A VM `resumed` from
        memory runs the agent it had when saved (delivering another would find its port taken)."""
        deadline = time.monotonic() + (timeout or self.config.boot_timeout)
        image = _known(job.image, "image")
        if image.firmware_boot is not None and not resumed:
            memory = DeliveryMemory(self.config.state_dir / DELIVERIES_DIR)
            sha256 = image.entry.artifacts["disk"].sha256
            remembered = memory.recall(sha256)
            reached = delivery.reach_agent(
                job.socket_path, job.qga_socket, job.console_log, deadline,
                lambda sock: AgentClient(sock, max_file_bytes=self.config.output_max_bytes),
                lambda why, hint: self._boot_failure(job, why, hint), remembered=remembered,
                grace=self.config.stock_boot_grace)
            job.agent_delivery, job.agent_delivery_remembered = reached.delivery, reached.remembered
            if reached.delivery != remembered:
                memory.remember(sha256, reached.delivery)
            return reached.client
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                sock.connect(str(job.socket_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise self._boot_failure(job, "the agent channel never appeared") from None
                time.sleep(0.1)
        client = AgentClient(sock, max_file_bytes=self.config.output_max_bytes)
        try:
            client.handshake(timeout=max(1.0, deadline - time.monotonic()))
        except AgentError as exc:
            client.close()
            raise self._boot_failure(job, exc.message) from None
        job.agent_delivery = delivery.delivery_of(client)
        return client

    def _explain_guest_death(self, job: Job, exc: AgentError) -> AgentError:
        """The agent vanished mid-command: say what the console says (panic, OOM), where it is."""
        time.sleep(0.5)                          # let virtlogd flush the last console lines
        exc.phase = exc.phase or "exec"
        crash = crash_line(job.console_log)
        if crash:
            exc.message += f"; the guest console says: {guest_text(crash)}"
        elif note := diskfull.io_pause_note(job.machine, job.overlay):
            exc.message += note
        elif not _domain_alive(job):
            exc.message += (cgroups.oom_note(job.oom_kills)
                            or "; the VM is gone (its QEMU process exited or was killed on the host)")
        exc.hint = (f"this is not the command's own exit status; console log {job.console_log}"
                    + (f"; the job's state is kept per --snapshot ({job.spec.snapshot})"))
        return exc

    def _boot_failure(self, job: Job, why: str, hint: Optional[str] = None) -> GuestTimeout:
        time.sleep(0.5)   # let virtlogd flush the last console lines
        console = "\n".join(guest_text(line) for line in failure_tail(job.console_log).split("\n"))
        return GuestTimeout(
            f"the guest never reached the agent ({why}); console log {job.console_log}, last lines:\n{console}",
            hint=hint or ("check the image boots (vmloader run --console shows the boot live); "
                          "a slow host may need a larger boot_timeout"), phase="boot")

    def _finish(self, job: Job) -> Optional[str]:
        try:
            if job.client is not None and job.exec_started:
                with job.timer.phase("collect"):
                    self._collect_outputs(job, job.client)
        finally:                                  # whatever collecting did, the VM is stopped
            with job.timer.phase("teardown"):
                if job.watch is not None:
                    job.watch.stop()
                self._stop_domain(job)
                if job.kept is not None:
                    diskfull.best_effort("the kept disk's owner", privatefiles.reclaim, job.kept.disk)
                if job.plan is not None and job.plan.lane is not None:
                    diskfull.best_effort("the warm state's owner", job.plan.lane.reclaim)
        with job.timer.phase("snapshot"):
            snapshot_id = self._keep_or_drop(job)
        diskfull.best_effort("the job record", self._write_metadata, job, snapshot_id)
        return snapshot_id

    def _collect_outputs(self, job: Job, client: AgentClient) -> None:
        outputs = list(job.spec.outputs)
        if job.spec.collect_new and job.before is not None:
            try:
                after = _file_stamps(client.list_dir(GUEST_WORKDIR))
            except VMLoaderError as exc:
                print(f"vmloader: could not list the guest work dir for new outputs: {exc.message}",
                      file=sys.stderr)
                job.output_errors.append({"output": "(new files)", "message": exc.message})
                after = {}
            outputs += [name for name, stamp in sorted(after.items())
                        if job.before.get(name) != stamp and name not in outputs]
        for out in outputs:
            if sandboxnames.reserved(out):
                print(f"vmloader: refused output {guesttext.escape(out)}: {sandboxnames.REFUSAL}", file=sys.stderr)
                job.output_errors.append({"output": out, "message": sandboxnames.REFUSAL})
                continue
            try:
                client.get_file(out, str(job.spec.output_dir))
            except VMLoaderError as exc:
                shown = guest_text(out)               # a name the guest listed: any bytes
                print(f"vmloader: could not copy back --output {shown}: {exc.message}", file=sys.stderr)
                job.output_errors.append({"output": shown, "message": exc.message})

    def _save_memory(self, job: Job) -> bool:
        """Stop the VM by saving its memory (the timed-out command still in it); False if that failed."""
        if job.machine is None or not job.machine.is_active():
            return False
        try:
            job.machine.save(job.memory_state)
        except VMLoaderError as exc:
            print(f"vmloader: could not save the guest's memory ({exc.message}); "
                  "keeping its disk state only", file=sys.stderr)
            job.memory_state.unlink(missing_ok=True)
            return False
        return True

    def _stop_domain(self, job: Job) -> None:
        saved = job.keep_memory and job.status == EXIT_TIMEOUT and self._save_memory(job)
        if saved:
            _known(job.client, "agent client").close()     # keep_memory is only set by a command it ran
            job.client = None
        keeps_disk = job.exec_started and should_keep(job.spec.snapshot, job.status != 0)
        if job.client is not None:
            if keeps_disk:
                try:
                    # The agent acknowledges only after sync(): the overlay is consistent,
                    # so the VM can be destroyed at once instead of waiting for power-off.
                    job.client.shutdown()
                except VMLoaderError:
                    pass
            # else nothing of the disk is kept (outputs are already copied back): killed at once
            job.client.close()
        if job.machine is not None:
            if keeps_disk or saved:
                job.machine.destroy()             # (libvirt done with the files before they are kept)
            else:
                job.machine.kill()
        if job.machines is not None:
            job.machines.close()

    def _keep_or_drop(self, job: Job) -> Optional[str]:
        failed = job.status != 0
        if job.exec_started and should_keep(job.spec.snapshot, failed) and job.overlay.exists():
            image = _known(job.image, "image")                # resolved before exec started
            meta = SnapshotMeta(
                id=job.job_dir.name, created=time.time(), image=image.entry.ref,
                image_sha256=image.entry.artifacts["disk"].sha256, base_path=str(image.disk),
                command=list(job.spec.command), exit_status=job.status, outcome=outcome_of(job.status),
                user=_user_name(), hostname=socket.gethostname(), timings=job.timer.to_dict(),
                error=job.error.message if job.error else None, env=dict(job.spec.env), root=job.spec.root,
                memory=job.memory_state.exists())
            try:
                if job.plan is not None and job.plan.lane is not None:
                    # Independent of the lane's layer (reused and dropped by later jobs): what the
                    # overlay reads from it is copied in, its backing becomes the image itself.
                    proc.run(["qemu-img", "rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.disk),
                              str(job.overlay)], phase="snapshot")
                kept = self.store.preserve(meta, job.overlay, job.console_log, job.memory_state,
                                           job.nvram).meta.id
            except VMLoaderError as exc:
                job.error = job.error or exc
                return None
            # A stock image's seed and variable store are per job: whatever boots or resumes the
            # snapshot gets its own (retarget_saved_xml), so the kept job's are not left behind.
            job.nvram.unlink(missing_ok=True)
            job.seed.unlink(missing_ok=True)
            return kept
        job.overlay.unlink(missing_ok=True)
        job.memory_state.unlink(missing_ok=True)
        job.nvram.unlink(missing_ok=True)
        job.seed.unlink(missing_ok=True)
        return None

    def _write_metadata(self, job: Job, snapshot_id: Optional[str]) -> None:
        for sock in (job.socket_path, *job.attach_sockets):
            sock.unlink(missing_ok=True)
            sock.with_name(sock.name + ".lock").unlink(missing_ok=True)
        data = {"job_id": job.job_dir.name, "command": list(job.spec.command), "image": job.spec.image,
                "exit_status": job.status, "outcome": outcome_of(job.status), "snapshot": snapshot_id,
                "start": job.start, "timings": job.timer.to_dict(), "error": job.error.to_dict() if job.error else None,
                "agent_delivery": job.agent_delivery, "agent_delivery_remembered": job.agent_delivery_remembered}
        privatefiles.write_private(job.job_dir / "metadata.json", json.dumps(data, indent=2) + "\n")

    def _write_tails(self, job: Job, out: TailWriter, err: TailWriter) -> None:
        if job.spec.capture_dir:
            out.out.close()
            err.out.close()
        snapshot = self.store.root / job.job_dir.name
        for name, writer in (("stdout.tail", out), ("stderr.tail", err)):
            privatefiles.write_private(job.job_dir / name, bytes(writer.last))
            if snapshot.is_dir():                # `vmloader snapshot logs` shows them
                privatefiles.write_private(snapshot / name, bytes(writer.last))

    def _result(self, job: Job, job_id: str, snapshot_id: Optional[str]) -> JobResult:
        captured = job.spec.capture_dir
        return JobResult(
            job_id=job_id, exit_status=job.status, outcome=outcome_of(job.status),
            image=job.image.entry.ref if job.image else job.spec.image,
            hypervisor=job.hypervisor.name if job.hypervisor else "",
            timings=job.timer.to_dict(), snapshot=snapshot_id, job_dir=str(job.job_dir),
            console_log=str(job.console_log),
            stdout_path=str(job.job_dir / "stdout") if captured else None,
            stderr_path=str(job.job_dir / "stderr") if captured else None,
            error=job.error.to_dict() if job.error else None, output_errors=list(job.output_errors),
            start=job.start, agent_delivery=job.agent_delivery,
            agent_delivery_remembered=job.agent_delivery_remembered)


def host_credentials(config: Config, image: str, user: str) -> list:
    """The worker's host certificate and key (config host_cert/host_key), for grid tools in the guest:
    only into the images and for the users the worker's config names (whoever is root in such a guest
    can read the key and act as the worker)."""
    if image not in config.host_cert_images and user not in config.host_cert_users:
        return []
    files = []
    for setting, name, mode in (("host_cert", "hostcert.pem", 0o644), ("host_key", "hostkey.pem", 0o600)):
        path = getattr(config, setting)
        if path is None:
            continue
        if not os.access(path, os.R_OK):
            raise VMLoaderError(f"{setting} {path} is not readable by {user}",
                                hint=f"let the users that run jobs read it (e.g. group-readable by a "
                                     f"group they share), or unset {setting}", phase="stage-in")
        files.append(GuestFile(str(path), f"/etc/grid-security/{name}", mode))
    return files


def _file_stamps(entries: list[P.DirEntry]) -> dict:
    """Regular files only: a symlink the job made is never followed on the way out."""
    return {e.name: (e.size, e.mtime_ns) for e in entries
            if e.type == "file" and "/" not in e.name and e.name not in (".", "..")}


def _known(value: Optional[T], what: str) -> T:
    """A job's `what`, set by an earlier phase: missing here is a bug in vmloader."""
    if value is None:
        raise VMLoaderError(f"internal error: the job's {what} is missing at this point")
    return value


def _domain_alive(job: Job, settle: float = 3.0) -> bool:
    """Whether the VM still runs (libvirt notices a dead QEMU within a moment: give it that)."""
    deadline = time.monotonic() + settle
    while True:
        alive = job.machine is not None and job.machine.is_active()
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _write_owner(job: Job, domain: Optional[str] = None) -> None:
    """Who runs this job, the VM it has running now (`domain`: the job's own, or a warm state's
    build or lane) and what it wants kept: lets a later vmloader clean up if we die."""
    privatefiles.write_private(job.job_dir / "owner.json", json.dumps(
        {"pid": os.getpid(), "domain": domain or job.domain_name, "snapshot": job.spec.snapshot,
         "command": list(job.spec.command),
         "image": job.spec.image, "started": time.time()}) + "\n")


def _private_overlay(backing: Path, path: Path, phase: str) -> None:
    """A qcow2 overlay at `path` on `backing`, readable by its owner (and QEMU) only."""
    proc.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(path)], phase=phase)
    privatefiles.restrict(path)


def _hostname(job: Job) -> str:
    return "vm-" + re.sub(r"[^A-Za-z0-9-]", "-", job.job_dir.name[-6:])


def _cmdline(image: ResolvedImage, network: str, hostname: Optional[str]) -> str:
    named = f" vmloader.hostname={hostname}" if hostname else ""
    return f"{image.entry.cmdline} panic=1{named} vmloader.net={network}"


def _refuse_unbootable(image: ResolvedImage) -> None:
    """A catalogue entry may say bios for a disk SeaBIOS cannot boot: fail before any VM (a warm
    state's build included), not at the boot timeout."""
    if image.firmware_boot == "bios":
        problem = bootmode.bios_boot_problem(bootmode.read_head(image.disk))
        if problem:
            raise ImageError(f"image {image.entry.ref} cannot boot with SeaBIOS: {problem}", phase="boot",
                             hint="check the image (`images add` detects its boot mode from the disk)")


def _warmable(image: ResolvedImage) -> bool:
    """Our images (direct kernel boot) and stock images booted by SeaBIOS: their state is the saved
    memory and disk alone. A UEFI guest also has its variable store in flash, outside the saved
    state: its jobs boot cold."""
    return image.firmware_boot != "uefi"


def _say_unusable(image: ResolvedImage, why: WarmUnusable) -> None:
    print(f"vmloader: warm state for {image.entry.ref} unusable ({why.message}); booting cold and rebuilding it",
          file=sys.stderr)


def _boot_spec(image: ResolvedImage, cmdline: str, nvram: Path, kept: Optional[Snapshot] = None) -> BootSpec:
    """`kept`: the snapshot the job boots, whose UEFI variable store (if it has one) the job
    starts from, as the machine it was taken from would."""
    if image.kernel is None:                 # firmware boot: the disk's own boot loader
        if image.entry.firmware == "uefi":
            kept_vars = kept.uefi_vars if kept is not None and kept.uefi_vars.is_file() else None
            code = firmware.uefi_vars_copy(nvram, kept_vars)
            return BootSpec(None, None, firmware="uefi", loader=str(code), nvram=str(nvram))
        return BootSpec(None, None)
    return BootSpec(str(image.kernel), str(image.initrd) if image.initrd else None, cmdline)


def _raise_for_spawn_error(result: ExecResult) -> None:
    """The command never started: say why, with the docker-run exit code for it."""
    if result.error == "not_found":
        raise JobCommandNotFound(f"{result.message} (command not found in the guest)",
                                 hint="check the command name and the guest's PATH, or ship it with --input",
                                 phase="exec")
    if result.error == "not_executable":
        raise JobCommandNotExecutable(f"{result.message} (command not executable in the guest)",
                                      hint="check its permissions (chmod +x) and its #! line", phase="exec")
    if result.error:
        raise AgentError(f"the agent could not run the command: {result.message}", phase="exec")


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())

"""The one place a job runner is wired up: config -> image cache, snapshot store,
hypervisor choice, machine connection. The CLI (`run`, `snapshot exec/shell/boot`) and
the HTCondor wrapper all call `job_runner`."""
import threading
from typing import BinaryIO, Callable, List, Optional

from . import hypervisors, qemucgroup, virt
from .cache import ImageCache
from .config import Config
from .errors import VMLoaderError
from .agentclient import ExecResult
from .job import JobResult, JobRunner, JobSpec, Session
from .snapshots import SnapshotStore


def host_probes(cfg: Config, boot_test: bool = True) -> hypervisors.HostProbes:
    """Host probes; with `boot_test`, they test-boot a real guest kernel under KVM when one is cached."""
    if not boot_test:
        return hypervisors.HostProbes()
    try:
        image = ImageCache(cfg.cache_dir).resolve("debian-12")
        kernel = (str(image.kernel), str(image.initrd))
    except VMLoaderError:
        kernel = None
    return hypervisors.HostProbes(probe_kernel=kernel)


def job_runner(cfg: Config, *, hypervisor: Optional[str] = None, boot_test: bool = True,
               cache: Optional[ImageCache] = None, store: Optional[SnapshotStore] = None,
               stdin: Optional[BinaryIO] = None, stdout: Optional[BinaryIO] = None,
               stderr: Optional[BinaryIO] = None, session: Optional[Session] = None,
               connect: virt.Connect = virt.LibvirtMachines,
               host_cgroups: Optional[qemucgroup.HostCgroups] = None) -> JobRunner:
    """A runner as configured; `hypervisor` forces one (else the best usable), probed when a job
    reaches that phase, not before."""
    def choose() -> hypervisors.Hypervisor:
        return hypervisors.choose(hypervisors.detect(host_probes(cfg, boot_test)), hypervisor)
    return JobRunner(cfg, cache or ImageCache.configured(cfg), store or SnapshotStore(cfg.snapshots_dir),
                     choose, stdin=stdin, stdout=stdout, stderr=stderr, session=session, connect=connect,
                     host_cgroups=host_cgroups)


def warm_up(cfg: Config, image: str, *, cpus: Optional[int] = None, memory_mib: Optional[int] = None,
            network: str = "user", lanes: int = 1, progress: Callable[[str], None] = lambda line: None,
            make_runner: Optional[Callable[[Session], JobRunner]] = None) -> List[JobResult]:
    """`images warm`: `lanes` jobs of this shape at once, each holding its lane until all have one,
    so every lane is built (or found complete and checked) ahead of the first real job."""
    together = threading.Barrier(lanes, timeout=cfg.boot_timeout + 600)
    results: List[JobResult] = []

    def hold(_attached, _out, _err) -> ExecResult:
        try:
            together.wait()
        except threading.BrokenBarrierError:
            pass                                 # another lane failed: this one is ready all the same
        return ExecResult(0, None, None)

    def one(n: int) -> None:
        runner = make_runner(hold) if make_runner is not None else job_runner(cfg, session=hold)
        result = runner.run(JobSpec(image=image, command=("true",), cpus=cpus,
                                                           memory_mib=memory_mib, network=network,
                                                           snapshot="never"))
        built = result.timings.get("warm build")
        if result.start == "warm":
            progress(f"{image}: lane {'built in %.1f s' % built if built else 'ready (already built)'}")
        else:
            progress(f"{image}: no warm state ({(result.error or {}).get('message') or 'booted cold'})")
        results.append(result)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(lanes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results

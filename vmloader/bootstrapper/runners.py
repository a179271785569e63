"""The one place a job runner is wired up: config -> image cache, snapshot store,
hypervisor choice, machine connection. The CLI (`run`, `snapshot exec/shell/boot`) and
the HTCondor wrapper all call `job_runner`."""
from typing import BinaryIO, Optional

from . import hypervisors, virt
from .cache import ImageCache
from .config import Config
from .errors import VMLoaderError
from .job import JobRunner, Session
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
               connect: virt.Connect = virt.LibvirtMachines) -> JobRunner:
    """A runner as configured; `hypervisor` forces one (else the best usable), probed when a job
    reaches that phase, not before."""
    def choose() -> hypervisors.Hypervisor:
        return hypervisors.choose(hypervisors.detect(host_probes(cfg, boot_test)), hypervisor)
    return JobRunner(cfg, cache or ImageCache.configured(cfg), store or SnapshotStore(cfg.snapshots_dir),
                     choose, stdin=stdin, stdout=stdout, stderr=stderr, session=session, connect=connect)

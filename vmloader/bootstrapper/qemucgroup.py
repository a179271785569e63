"""QEMU's process in the caller's cgroups when the system libvirtd starts it.

Unprivileged, a job's VM is started by its private libvirt session daemon, a descendant of the
job: QEMU inherits the job's cgroups and HTCondor counts and limits it. As root (euid 0) vmloader
uses `qemu:///system`, whose libvirtd starts QEMU in libvirt's own machine cgroup, outside the
job. With `qemu_cgroup = "caller"` (always under the HTCondor wrapper) the VM is started paused,
QEMU's process (all its threads: its pid into `cgroup.procs`) is moved into the cgroups this
process is in, and only then does the VM run. Memory is charged to the cgroup of the task that
first touches a page and does not move with the task (cgroup v2 never moves it; v1's
`move_charge_at_immigrate` is gone from current kernels), so the guest must not run before the
move: every page it touches afterwards is the job's.

Which cgroups: in cgroup v1 every hierarchy in which the caller sits below the root, except
`devices` (libvirt's device ACL keeps confining QEMU) and `cpuset` (libvirt pins QEMU's threads
there; a cpuset cgroup admits tasks only once its cpus and mems are set, and HTCondor does not
use cpuset v1: it pins with sched_setaffinity); named hierarchies (`name=systemd`) have no
controller and count nothing. In cgroup v2 the caller's unified cgroup. A caller in the root
cgroup everywhere is in no job: nothing moves.
"""
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

from .errors import CgroupError
from .virt import Machine, Machines

log = logging.getLogger(__name__)

CALLER = "caller"        # qemu_cgroup: QEMU joins the caller's cgroups (the HTCondor wrapper's choice)
LIBVIRT = "libvirt"      # qemu_cgroup: QEMU stays where libvirt puts it (plain CLI default)
SETTINGS = (CALLER, LIBVIRT)

NOT_MOVED = {
    "devices": "libvirt's device ACL for QEMU stays in force",
    "cpuset": "libvirt pins QEMU's threads there and HTCondor does not use cpuset v1",
}


@dataclass(frozen=True)
class HostCgroups:
    """Where this process's cgroups are read and written (tests pass a directory of their own)."""
    proc_cgroup: Path = Path("/proc/self/cgroup")
    mount: Path = Path("/sys/fs/cgroup")
    euid: int = field(default_factory=os.geteuid)


@dataclass(frozen=True)
class Placement:
    """The cgroup directories QEMU's pid is written into, and the hierarchies left alone (why)."""
    targets: Tuple[Path, ...]
    skipped: Tuple[str, ...] = ()


def caller_placement(host: HostCgroups) -> Optional[Placement]:
    """The caller's own cgroups below the root (see the module's note); None when there are none."""
    try:
        lines = host.proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    targets, skipped = [], []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if path.strip("/") == "" or controllers.startswith("name="):
            continue
        if controllers == "":                       # v2: the unified hierarchy (alone, or hybrid's)
            targets.append(_unified_mount(host.mount) / path.lstrip("/"))
            continue
        held = sorted(set(controllers.split(",")) & set(NOT_MOVED))
        if held:
            skipped.append(f"{controllers} ({NOT_MOVED[held[0]]})")
        else:
            targets.append(host.mount / controllers / path.lstrip("/"))
    return Placement(tuple(targets), tuple(skipped)) if targets else None


def _unified_mount(mount: Path) -> Path:
    return mount if (mount / "cgroup.controllers").exists() else mount / "unified"


def placement_for(setting: str, uri: str, host: HostCgroups) -> Optional[Placement]:
    """Where QEMU must be moved for this connection: only as root, against the system libvirtd
    (a session daemon starts QEMU in the caller's tree already), with `qemu_cgroup = "caller"`."""
    if setting != CALLER or host.euid != 0 or uri.split("?")[0].replace("+unix", "") != "qemu:///system":
        return None
    return caller_placement(host)


def move(pid: int, placement: Placement) -> None:
    """Write `pid` into each target's cgroup.procs (all its threads move); CgroupError if one refuses."""
    log.debug("moving QEMU pid %d into %s (left alone: %s)", pid, ", ".join(map(str, placement.targets)),
              "; ".join(placement.skipped) or "nothing")
    for target in placement.targets:
        try:
            fd = os.open(target / "cgroup.procs", os.O_WRONLY | os.O_NOFOLLOW)
            try:
                os.write(fd, f"{pid}\n".encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise CgroupError(
                f"cannot move QEMU (pid {pid}) into this job's cgroup {target}: {exc.strerror or exc}",
                hint="vmloader runs as root against the system libvirtd and puts QEMU into its own "
                     "cgroups so the job's limits apply to the VM; check that the cgroup still exists "
                     "(the job may be ending) and that root may write its cgroup.procs. Outside HTCondor, "
                     'qemu_cgroup = "libvirt" in /etc/vmloader/config.toml leaves QEMU in libvirt\'s '
                     "cgroup, uncounted", phase="define") from None


class AccountedMachines:
    """A `virt.Machines` whose VMs start paused, join `placement`, then run."""

    def __init__(self, inner: Machines, placement: Placement):
        self.inner = inner
        self.placement = placement

    def create(self, xml: str, paused: bool = False) -> Machine:
        return self._join(self.inner.create(xml, paused=True), paused)

    def restore(self, state: Path, xml: str, name: str, paused: bool = False) -> Machine:
        print("vmloader: the memory restored from a saved state stays charged to libvirt's cgroup "
              "(memory does not move with QEMU); what the guest touches from now on is the job's",
              file=sys.stderr)
        return self._join(self.inner.restore(state, xml, name, paused=True), paused)

    def _join(self, machine: Machine, paused: bool) -> Machine:
        try:
            pid = machine.qemu_pid()
            if pid is None:
                raise CgroupError(f"cannot find the QEMU process of VM {machine.name} to move it into "
                                  "this job's cgroup", hint="see libvirtd's log; is the VM still running?",
                                  phase="define")
            move(pid, self.placement)
            if not paused:
                machine.resume()
        except BaseException:           # (a stop signal too: the VM is not left running outside any job)
            machine.destroy()
            raise
        return machine

    def saved_xml(self, state: Path) -> str:
        return self.inner.saved_xml(state)

    def host_identity(self) -> dict:
        return self.inner.host_identity()

    def close(self) -> None:
        self.inner.close()

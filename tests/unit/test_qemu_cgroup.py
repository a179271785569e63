"""QEMU joins the caller's cgroups when the system libvirtd starts it (qemucgroup.py): which
cgroups, when, and in which order with the VM's start, against a fake cgroup filesystem (a
directory of the test) and the fake machine."""
from pathlib import Path

import pytest

from vmloader.bootstrapper import qemucgroup
from vmloader.bootstrapper.condor import _machine_overrides
from vmloader.bootstrapper.config import load
from vmloader.bootstrapper.errors import EXIT_INFRA, EXIT_TIMEOUT
from vmloader.bootstrapper.qemucgroup import HostCgroups, Placement, caller_placement, placement_for

from fakemachine import FAKE_PID_BASE
from test_job_runner import Rig, torn_down, world  # noqa: F401  (world: the fixture)

SYSTEM = "qemu:///system"
JOB = "/htcondor/condor_var_lib_condor_execute_slot1_1@worker"
# This machine's v1 layout (cpu and cpuacct mounted apart), with the caller in a job's cgroup.
V1_JOB = "\n".join([
    "9:name=systemd:/", f"8:pids:{JOB}", f"7:blkio:{JOB}", f"6:freezer:{JOB}", f"5:devices:{JOB}",
    f"4:memory:{JOB}", f"3:cpuset:{JOB}", f"2:cpuacct:{JOB}", f"1:cpu:{JOB}", "0::/"]) + "\n"
V1_ROOT = "\n".join(["9:name=systemd:/", "4:memory:/", "2:cpuacct:/", "1:cpu:/", "0::/"]) + "\n"


def fake_host(root: Path, proc_cgroup: str, euid: int = 0, unified: str = "") -> HostCgroups:
    """A cgroup filesystem under `root`: every cgroup named in `proc_cgroup`, with cgroup.procs."""
    mount = root / "cgroup"
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        base = mount / (controllers or unified)
        (base / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (base / path.lstrip("/") / "cgroup.procs").write_text("")
    if unified == "":
        (mount / "cgroup.controllers").write_text("memory cpu io pids\n")
    (root / "self-cgroup").write_text(proc_cgroup)
    return HostCgroups(root / "self-cgroup", mount, euid)


def moved_into(host: HostCgroups) -> list:
    """The cgroup dirs (relative to the mount) whose cgroup.procs were written."""
    return sorted(str(p.parent.relative_to(host.mount)) for p in host.mount.rglob("cgroup.procs")
                  if p.read_text())


def test_v1_moves_into_every_controller_hierarchy_but_devices_and_cpuset(tmp_path):
    host = fake_host(tmp_path, V1_JOB)
    placement = caller_placement(host)
    assert placement is not None
    assert sorted(str(t.relative_to(host.mount)) for t in placement.targets) == sorted(
        f"{c}{JOB}" for c in ("pids", "blkio", "freezer", "memory", "cpuacct", "cpu"))
    assert [s.split(" ")[0] for s in placement.skipped] == ["devices", "cpuset"]
    qemucgroup.move(4242, placement)
    assert moved_into(host) == sorted(f"{c}{JOB}" for c in ("pids", "blkio", "freezer", "memory", "cpuacct", "cpu"))
    assert (host.mount / f"memory{JOB}" / "cgroup.procs").read_text() == "4242\n"


def test_co_mounted_controllers_are_one_hierarchy(tmp_path):
    host = fake_host(tmp_path, f"4:memory:{JOB}\n2:cpu,cpuacct:{JOB}\n0::/\n")
    placement = caller_placement(host)
    assert placement is not None
    assert sorted(str(t.relative_to(host.mount)) for t in placement.targets) == [f"cpu,cpuacct{JOB}", f"memory{JOB}"]


def test_v2_moves_into_the_unified_cgroup(tmp_path):
    host = fake_host(tmp_path, "0::/system.slice/condor.service/slot1_1\n")
    assert caller_placement(host) == Placement((host.mount / "system.slice/condor.service/slot1_1",))


def test_hybrid_finds_the_unified_hierarchy_under_its_own_mount(tmp_path):
    host = fake_host(tmp_path, f"4:memory:{JOB}\n0::{JOB}\n", unified="unified")
    placement = caller_placement(host)
    assert placement is not None and host.mount / f"unified{JOB}" in placement.targets


def test_nothing_moves_for_a_caller_in_the_root_cgroup(tmp_path):
    assert caller_placement(fake_host(tmp_path, V1_ROOT)) is None
    assert caller_placement(fake_host(tmp_path / "v2", "0::/\n")) is None


@pytest.mark.parametrize("setting, uri, euid", [
    ("caller", SYSTEM, 1000),                     # not root: its session daemon is in its tree already
    ("caller", "qemu:///session", 0),
    ("caller", "xen:///system", 0),
    ("libvirt", SYSTEM, 0),                       # the plain CLI's default
])
def test_nothing_moves_unless_root_on_the_system_daemon_asked_to(tmp_path, setting, uri, euid):
    assert placement_for(setting, uri, fake_host(tmp_path, V1_JOB, euid=euid)) is None


def test_root_on_the_system_daemon_with_caller_moves(tmp_path):
    assert placement_for("caller", SYSTEM, fake_host(tmp_path, V1_JOB)) is not None
    assert placement_for("caller", "qemu+unix:///system", fake_host(tmp_path, V1_JOB)) is not None


def test_the_htcondor_wrapper_always_moves_and_the_cli_only_when_configured():
    assert _machine_overrides(None)["qemu_cgroup"] == "caller"
    assert load(files=(), environ={}).qemu_cgroup == "libvirt"
    assert load(files=(), environ={"VMLOADER_QEMU_CGROUP": "caller"}).qemu_cgroup == "caller"
    with pytest.raises(Exception, match="expected caller or libvirt"):
        load(files=(), environ={"VMLOADER_QEMU_CGROUP": "machine"})


def accounted_rig(root: Path, host: HostCgroups, **options) -> Rig:
    return Rig(root, libvirt_uri=SYSTEM, qemu_cgroup="caller", host_cgroups=host, **options)


def test_a_cold_vm_starts_paused_joins_the_cgroups_and_only_then_runs(world):
    host = fake_host(world / "fs", V1_JOB)
    seen = []
    rig = accounted_rig(world, host, on_resume=lambda machine: seen.append(moved_into(host)))
    result = rig.run("echo", "hello", snapshot="never")
    assert result.exit_status == 0, result.error
    kinds = rig.fake.kinds()
    assert kinds[kinds.index("create"):kinds.index("identity")] == ["create", "paused", "resume"]
    assert seen == [sorted(f"{c}{JOB}" for c in ("pids", "blkio", "freezer", "memory", "cpuacct", "cpu"))]
    assert (host.mount / f"cpuacct{JOB}" / "cgroup.procs").read_text() == f"{FAKE_PID_BASE}\n"
    assert not (host.mount / f"devices{JOB}" / "cgroup.procs").read_text()


def test_a_resumed_memory_state_is_restored_paused_moved_then_run(world, capsys):
    host = fake_host(world / "fs", V1_JOB)
    rig = accounted_rig(world, host)
    first = rig.run("sleep", "60", timeout=1.0, snapshot="on-failure")
    assert first.exit_status == EXIT_TIMEOUT
    for cgroup_procs in host.mount.rglob("cgroup.procs"):
        cgroup_procs.write_text("")
    again = rig.run("echo", "resumed", snapshot="never", from_snapshot=first.snapshot)
    assert again.exit_status == 0, again.error
    kinds = rig.fake.kinds()
    at = kinds.index("restore")
    assert kinds[at:at + 3] == ["restore", "paused", "resume"]
    assert (host.mount / f"memory{JOB}" / "cgroup.procs").read_text() == f"{FAKE_PID_BASE + 1}\n"
    assert "stays charged to libvirt's cgroup" in capsys.readouterr().err


def test_a_vm_that_joins_the_cgroups_boots_cold_not_warm(world):
    rig = accounted_rig(world, fake_host(world / "fs", V1_JOB), warm_start=True)
    result = rig.run("true", snapshot="never")
    assert result.exit_status == 0 and result.start == "cold"
    assert "restore" not in rig.fake.kinds()


def test_a_cgroup_that_is_gone_is_an_infrastructure_error_and_the_vm_is_destroyed(world):
    host = fake_host(world / "fs", V1_JOB)
    (host.mount / f"memory{JOB}" / "cgroup.procs").unlink()
    (host.mount / f"memory{JOB}").rmdir()
    rig = accounted_rig(world, host)
    result = rig.run("echo", "never runs", snapshot="never")
    assert result.exit_status == EXIT_INFRA and result.error["phase"] == "define"
    assert f"cannot move QEMU (pid {FAKE_PID_BASE}) into this job's cgroup" in result.error["message"]
    assert f"memory{JOB}" in result.error["message"]
    assert "resume" not in rig.fake.kinds() and torn_down(rig.fake)


def test_a_qemu_whose_pid_cannot_be_told_is_an_infrastructure_error(world):
    rig = accounted_rig(world, fake_host(world / "fs", V1_JOB), pid_known=False)
    result = rig.run("echo", "never runs", snapshot="never")
    assert result.exit_status == EXIT_INFRA and "cannot find the QEMU process" in result.error["message"]
    assert "resume" not in rig.fake.kinds() and torn_down(rig.fake)


def test_not_root_changes_nothing(world):
    host = fake_host(world / "fs", V1_JOB, euid=1000)
    rig = accounted_rig(world, host)
    result = rig.run("true", snapshot="never")
    assert result.exit_status == 0 and "paused" not in rig.fake.kinds() and moved_into(host) == []

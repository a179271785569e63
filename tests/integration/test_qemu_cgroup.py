"""As root, against the system libvirtd, QEMU joins the cgroups vmloader runs in (qemucgroup.py):
the guest's memory and QEMU's CPU time are the caller's, as under an HTCondor starter.

The test makes its own cgroup v1 memory, cpuacct and cpu cgroups (on this machine cpu and cpuacct are
mounted apart under /sys/fs/cgroup), starts `vmloader run` inside them and lets the guest fill
300 MiB of its RAM; a kept memory state is resumed in them the same way. It removes only the
cgroups it made."""
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import next_line

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]

V1 = Path("/sys/fs/cgroup")
MIB = 2 ** 20
FILL_MIB = 300


def _v1_mounted(controller: str) -> bool:
    return (V1 / controller / "cgroup.procs").exists() and not (V1 / "cgroup.controllers").exists()


need_v1_root = pytest.mark.skipif(os.geteuid() != 0 or not (_v1_mounted("memory") and _v1_mounted("cpuacct")),
                                  reason="needs root and cgroup v1 memory and cpuacct hierarchies")


@pytest.fixture
def own_cgroups():
    """Make named cgroups in the given v1 hierarchies; remove them (only them) afterwards."""
    made = []

    def make(*controllers: str) -> dict:
        name = f"vmloader-test-{secrets.token_hex(4)}"
        paths = {}
        for controller in controllers:
            path = V1 / controller / name
            path.mkdir()
            made.append(path)
            paths[controller] = path
        return paths
    yield make
    for path in reversed(made):
        _remove_when_empty(path)


def _remove_when_empty(path: Path) -> None:
    deadline = time.monotonic() + 120            # QEMU may still be exiting after its VM was destroyed
    while True:
        try:
            path.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _in_cgroups(paths: dict, argv: list) -> list:
    """argv, started by a shell that first puts itself into each cgroup (its children inherit them)."""
    joins = "; ".join(f'echo $$ > "{path}/cgroup.procs"' for path in paths.values())
    return ["sh", "-c", joins + '; exec "$@"', "sh", *argv]


def _qemu_pid(state_dir: Path, job_id: str) -> int:
    domain = json.loads((state_dir / "jobs" / job_id / "owner.json").read_text())["domain"]
    return int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text())


def _cgroup_of(proc: Path) -> dict:
    """controller -> path, from a /proc/PID(/task/TID)/cgroup file."""
    found = {}
    for line in proc.read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            found[controller] = path
    return found


def _cpu_ns(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * 10 ** 9 // os.sysconf("SC_CLK_TCK")


@need_v1_root
def test_as_root_qemu_with_all_its_threads_joins_the_callers_cgroups_and_is_charged_there(
        vm_env, state_dir, tmp_path, own_cgroups):
    cgroups = own_cgroups("memory", "cpuacct", "cpu")     # cpu: where libvirt spreads QEMU's threads
    name = "/" + cgroups["memory"].name
    fill = (f"import sys; b = b'x' * ({FILL_MIB} * 2 ** 20); print('filled', len(b) >> 20, flush=True); "
            "sys.stdin.readline(); print('done')")
    argv = [sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12", "--job-id",
            "qemucg", "--snapshot", "never", "--", "python3", "-c", fill]
    job = subprocess.Popen(_in_cgroups(cgroups, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=dict(vm_env, VMLOADER_QEMU_CGROUP="caller"), cwd=tmp_path)
    try:
        first = next_line(job).decode()                  # blocks until the guest has touched its 300 MiB
        assert first.split() == ["filled", str(FILL_MIB)], job.stderr.read().decode() if not first else first
        qemu = _qemu_pid(state_dir, "qemucg")
        placed = _cgroup_of(Path(f"/proc/{qemu}/cgroup"))
        assert placed["freezer"].startswith("/machine")   # a hierarchy vmloader is not in: left to libvirt
        threads = [_cgroup_of(t / "cgroup") for t in Path(f"/proc/{qemu}/task").iterdir()]
        assert len(threads) > 1
        assert {(t["memory"], t["cpuacct"], t["cpu"]) for t in threads} == {(name, name, name)}
        qemu_cpu = _cpu_ns(qemu)
        out, err = job.communicate(input=b"go\n", timeout=600)
    finally:
        if job.poll() is None:
            job.terminate()                                # vmloader destroys its VM on SIGTERM
            job.wait(timeout=300)
    assert job.returncode == 0, err.decode()
    assert out.decode().split() == ["done"]
    peak = int((cgroups["memory"] / "memory.max_usage_in_bytes").read_text())
    assert peak >= FILL_MIB * MIB, f"peak {peak // MIB} MiB"
    # QEMU's CPU time (a TCG boot: many seconds) is counted, not only vmloader's own
    used = int((cgroups["cpuacct"] / "cpuacct.usage").read_text())
    print(f"peak memory {peak // MIB} MiB, cpuacct {used / 1e9:.1f} s (QEMU {qemu_cpu / 1e9:.1f} s at the fill)")
    assert used >= qemu_cpu // 2


@need_v1_root
def test_as_root_the_wrapper_sizes_the_vm_within_its_cgroup_memory_limit(tmp_path, own_cgroups):
    """The memory limit is read from the same cgroup as root: a VM that would not fit is a clear
    infrastructure error (a hold under HTCondor), before anything boots."""
    cgroups = own_cgroups("memory")
    (cgroups["memory"] / "memory.limit_in_bytes").write_text(str(300 * MIB))
    ad = tmp_path / ".job.ad"
    ad.write_text('VMImage = "debian-12"\nRequestMemory = 2048\nRequestCpus = 1\n')
    env = dict(os.environ, _CONDOR_JOB_AD=str(ad), _CONDOR_SCRATCH_DIR=str(tmp_path))
    argv = [sys.executable, "-m", "vmloader.bootstrapper.cli", "condor", "wrapper", "--", "/bin/true"]
    done = subprocess.run(_in_cgroups(cgroups, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env, cwd=tmp_path, timeout=300)
    err = done.stderr.decode()
    assert done.returncode == 125, err
    assert "request_memory 2048 MiB (the job's cgroup memory limit 300 MiB) is too small" in err


@need_v1_root
def test_as_root_a_resumed_memory_state_joins_the_callers_cgroups_before_it_runs(
        vmloader, vm_env, state_dir, tmp_path, own_cgroups):
    """The restore path: restored paused, moved, resumed (its restored memory stays libvirt's, said so)."""
    kept = vmloader("run", "--image", "debian-12", "--job-id", "kept", "--timeout", "3", "--snapshot", "on-failure",
                    "--json", "--", "sleep", "600")
    assert kept.returncode == 124, kept.out + kept.err
    snapshot = kept.json()["snapshot"]
    cgroups = own_cgroups("memory", "cpuacct")
    name = "/" + cgroups["memory"].name
    argv = [sys.executable, "-m", "vmloader.bootstrapper.cli", "snapshot", "exec", snapshot, "--",
            "sh", "-c", "echo resumed; read line; echo done"]
    job = subprocess.Popen(_in_cgroups(cgroups, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=dict(vm_env, VMLOADER_QEMU_CGROUP="caller"), cwd=tmp_path)
    try:
        first = next_line(job).decode()
        assert first.strip() == "resumed", job.stderr.read().decode() if not first else first
        [resumed] = [d.name for d in (state_dir / "jobs").iterdir() if d.name != "kept"]
        placed = _cgroup_of(Path(f"/proc/{_qemu_pid(state_dir, resumed)}/cgroup"))
        assert placed["memory"] == name and placed["cpuacct"] == name
        out, err = job.communicate(input=b"go\n", timeout=600)
    finally:
        if job.poll() is None:
            job.terminate()
            job.wait(timeout=300)
    assert job.returncode == 0, err.decode()
    assert out.decode().split() == ["done"]
    assert "stays charged to libvirt's cgroup" in err.decode()

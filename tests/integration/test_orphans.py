"""A vmloader killed mid-job (SIGKILL): the next vmloader finds its VM and overlay and ends them."""
import json
import subprocess
import sys

import pytest

from .conftest import domains_left, job_domain, libvirt_domains, next_line

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]


def test_the_next_vmloader_destroys_an_orphaned_vm_and_keeps_its_state(vmloader, vm_env, state_dir, tmp_path):
    doomed = subprocess.Popen([sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12",
                               "--", "sh", "-c", "echo started; sleep 1000"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=vm_env, cwd=tmp_path)
    assert next_line(doomed) == b"started\n"
    [job_dir] = list((state_dir / "jobs").iterdir())
    [running] = vmloader("status", "--json").json()
    assert running["job_id"] == job_dir.name and running["image"] == "debian-12"
    assert running["phase"] == "exec" and running["qemu_pid"] and running["rss_bytes"] > 0
    domain = job_domain(job_dir)
    doomed.kill()
    doomed.wait()
    assert domain in libvirt_domains()          # the VM outlived its vmloader

    run = vmloader("run", "--image", "debian-12", "--snapshot", "never", "--", "true")
    assert run.returncode == 0, run.err
    assert f"cleaned up job {job_dir.name}" in run.err and "VM destroyed" in run.err
    assert domains_left({domain}) == set()
    assert not (job_dir / "overlay.qcow2").exists()
    meta = json.loads((state_dir / "snapshots" / job_dir.name / "metadata.json").read_text())
    assert meta["outcome"] == "orphaned" and meta["exit_status"] == 125
    assert json.loads((job_dir / "metadata.json").read_text())["outcome"] == "orphaned"
    assert vmloader("cleanup", "--json").json() == []
    assert vmloader("status", "--json").json() == []


def test_sigterm_to_vmloader_stops_the_vm_keeps_its_state_and_exits_143(vm_env, state_dir, tmp_path):
    """What condor_rm, preemption and walltime limits do: SIGTERM to the job's vmloader."""
    job = subprocess.Popen([sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12",
                            "--", "sh", "-c", "echo started; sleep 1000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=vm_env, cwd=tmp_path)
    assert next_line(job) == b"started\n"
    domain = job_domain(next((state_dir / "jobs").iterdir()))
    job.terminate()
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143, err
    assert b"stopped by SIGTERM" in err
    [job_dir] = list((state_dir / "jobs").iterdir())
    assert domains_left({domain}) == set()
    assert (state_dir / "snapshots" / job_dir.name / "disk.qcow2").exists()


def test_a_job_dir_removed_under_a_running_job_still_ends_its_vm(vm_env, state_dir, tmp_path):
    """Its records cannot be written any more (as on a full disk): the VM must be stopped all the same."""
    job = subprocess.Popen([sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12",
                            "--", "sh", "-c", "echo started; sleep 10; echo done"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=vm_env, cwd=tmp_path)
    assert next_line(job) == b"started\n"
    [job_dir] = list((state_dir / "jobs").iterdir())
    domain = job_domain(job_dir)
    subprocess.run(["rm", "-rf", str(job_dir)], check=True)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0 and out == b"done\n", err         # the command's own status
    assert domains_left({domain}) == set()

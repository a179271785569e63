"""condor_ssh_to_job into a VM job (sshtojob.py): finding the job's VM from its sandbox, and
what the ForceCommand says when there is none. The real sessions run on the pool (test_condor.py)."""
import json
import os
from pathlib import Path

import pytest

from vmloader.bootstrapper import condor, sandboxnames, sshtojob
from vmloader.bootstrapper.job import ATTACH_INFO

SHELL_SETUP = "/usr/libexec/condor/condor_ssh_to_job_shell_setup"


class Execed(Exception):
    """os.exec* replaced the process (in the test: stops the caller there)."""


@pytest.fixture
def sandbox(tmp_path):
    box = tmp_path / "execute" / "dir_123"
    (box / ".condor_ssh_to_job_1").mkdir(parents=True)
    (box / ".job.ad").write_text('VMImage = "debian-12"\nCmd = "/bin/sleep"\n')
    return box


def job_dir(tmp_path, phase=None, info=None) -> Path:
    path = tmp_path / "jobs" / "condor-1.0-abcdef"
    path.mkdir(parents=True, mode=0o700)
    if phase:
        (path / "phase").write_text(phase + "\n")
    if info is not None:
        (path / ATTACH_INFO).write_text(json.dumps(info))
    return path


def forced(sandbox: Path) -> list:
    return [SHELL_SETUP, str(sandbox / ".condor_ssh_to_job_1" / "env.sh")]


def test_the_sandbox_is_found_from_the_command_htcondor_forces(sandbox):
    assert sshtojob.sandbox_of(forced(sandbox)) == sandbox
    assert sshtojob.sandbox_of([SHELL_SETUP, str(sandbox / "elsewhere" / "env.sh")]) is None
    assert sshtojob.sandbox_of([SHELL_SETUP]) is None


def test_the_starters_sshd_is_recognised_and_a_job_command_is_not(sandbox):
    config = str(sandbox / ".condor_ssh_to_job_1" / "sshd_config")
    assert sshtojob.is_sshd(["/usr/sbin/sshd", "-i", "-e", "-f", config], sandbox)
    assert not sshtojob.is_sshd(["/usr/sbin/sshd", "-i", "-e", "-f", "/tmp/x/.condor_ssh_to_job_1/sshd_config"],
                                sandbox)
    assert not sshtojob.is_sshd(["./build.sh", "sshd_config"], sandbox)


def test_the_pointer_is_owner_only_and_removed_after(sandbox, tmp_path):
    target = job_dir(tmp_path)
    sshtojob.point(sandbox, target)
    pointer = sandbox / sandboxnames.VMLOADER_POINTER
    assert pointer.read_text().strip() == str(target) and pointer.stat().st_mode & 0o777 == 0o600
    sshtojob.unpoint(sandbox)
    assert not pointer.exists()


def test_a_guest_cannot_write_the_pointer_back_into_the_sandbox():
    assert sandboxnames.reserved(sandboxnames.VMLOADER_POINTER)


@pytest.mark.parametrize("phase", [None, "cache lookup", "boot", "stage-in"])
def test_a_vm_still_starting_says_so(sandbox, tmp_path, phase):
    if phase is not None:
        sshtojob.point(sandbox, job_dir(tmp_path, phase))
    with pytest.raises(sshtojob.SshToJobError, match="still starting") as caught:
        sshtojob.running_vm(sandbox)
    assert (phase or "setting up") in caught.value.message and "try again" in caught.value.hint


def test_the_exec_phase_before_the_attach_info_is_written_still_counts_as_starting(sandbox, tmp_path):
    sshtojob.point(sandbox, job_dir(tmp_path, "exec"))
    with pytest.raises(sshtojob.SshToJobError, match="still starting"):
        sshtojob.running_vm(sandbox)


@pytest.mark.parametrize("phase", ["collect", "teardown", "snapshot"])
def test_a_vm_tearing_down_says_so(sandbox, tmp_path, phase):
    sshtojob.point(sandbox, job_dir(tmp_path, phase, {"pid": os.getpid()}))
    with pytest.raises(sshtojob.SshToJobError, match="torn down") as caught:
        sshtojob.running_vm(sandbox)
    assert phase in caught.value.message


def test_a_running_command_gives_its_attach_info(sandbox, tmp_path):
    info = {"pid": os.getpid(), "user": "vmloader", "cwd": "/work", "env": {"FOO": "bar"}, "sockets": ["/x"]}
    sshtojob.point(sandbox, job_dir(tmp_path, "exec", info))
    assert sshtojob.running_vm(sandbox) == info


def test_attach_info_of_a_vmloader_that_has_ended_is_not_used(sandbox, tmp_path):
    sshtojob.point(sandbox, job_dir(tmp_path, "exec", {"pid": 2 ** 22 + 1}))
    with pytest.raises(sshtojob.SshToJobError, match="gone"):
        sshtojob.running_vm(sandbox)


def test_a_pointer_through_a_symlink_is_not_followed(sandbox, tmp_path):
    real = tmp_path / "elsewhere"
    real.write_text(str(job_dir(tmp_path, "exec", {"pid": os.getpid()})))
    (sandbox / sandboxnames.VMLOADER_POINTER).symlink_to(real)
    with pytest.raises(sshtojob.SshToJobError, match="symlink"):
        sshtojob.running_vm(sandbox)


def test_a_pointer_to_a_directory_others_may_write_is_refused(sandbox, tmp_path):
    target = job_dir(tmp_path, "exec", {"pid": os.getpid()})
    target.chmod(0o777)
    sshtojob.point(sandbox, target)
    with pytest.raises(sshtojob.SshToJobError, match="not a private directory"):
        sshtojob.running_vm(sandbox)


def test_a_job_without_vmimage_gets_htcondors_own_session(sandbox, monkeypatch):
    (sandbox / ".job.ad").write_text('Cmd = "/bin/sleep"\n')
    execs = []

    def execv(path, argv):
        execs.append(argv)
        raise Execed()
    monkeypatch.setattr(os, "execv", execv)
    with pytest.raises(Execed):
        sshtojob.run(forced(sandbox), {})
    assert execs == [forced(sandbox)]


def test_the_forcecommand_on_a_booting_vm_job_prints_why_and_fails(sandbox, capsys):
    assert sshtojob.run(forced(sandbox), {"SSH_ORIGINAL_COMMAND": "id"}) == 125
    err = capsys.readouterr().err
    assert "still starting" in err and "try again" in err


def test_the_shipped_sshd_template_forces_the_vmloader_command():
    template = (Path(__file__).resolve().parents[2] / "condor" / "ssh_to_job_sshd_config_template").read_text()
    lines = [line for line in template.splitlines() if line.startswith("ForceCommand")]
    assert lines == ["ForceCommand /usr/local/bin/vmloader condor ssh-to-job _INSERT_FORCE_COMMAND_"]


def test_the_wrapper_runs_the_starters_sshd_on_the_host(sandbox, monkeypatch):
    config = str(sandbox / ".condor_ssh_to_job_1" / "sshd_config")
    execs = []

    def execvp(path, argv):
        execs.append(argv)
        raise Execed()
    monkeypatch.setattr(os, "execvp", execvp)
    with pytest.raises(Execed):
        condor.run_wrapper(["/usr/sbin/sshd", "-i", "-e", "-f", config],
                           {"_CONDOR_JOB_AD": str(sandbox / ".job.ad"), "_CONDOR_SCRATCH_DIR": str(sandbox)})
    assert execs == [["/usr/sbin/sshd", "-i", "-e", "-f", config]]


def test_a_pointer_left_in_the_sandbox_is_not_an_input_of_the_job(sandbox, tmp_path):
    sshtojob.point(sandbox, job_dir(tmp_path))
    (sandbox / "input.txt").write_text("data")
    assert [guest for _, guest in condor.sandbox_inputs(sandbox)] == ["input.txt"]

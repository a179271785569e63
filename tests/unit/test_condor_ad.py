"""Reading job ads: what a submit file asks of vmloader, and clear errors for malformed attributes."""
from pathlib import Path

import pytest

from vmloader.bootstrapper import classad
from vmloader.bootstrapper.condor import JobAdError, guest_command, sandbox_inputs, vm_request

JOB_AD = r'''
ClusterId = 12
ProcId = 3
Cmd = "/home/u/build.sh"
VMImage = "debian-12"
VMLoaderRoot = true
VMLoaderSnapshotPolicy = "on_failure"
VMLoaderTimeout = 600
RequestCpus = 2
RequestMemory = 2048
RequestDisk = DiskUsage
Environment = "A=1 B='two words' C=3"
Requirements = (TARGET.Arch == "X86_64") && (TARGET.OpSys == "LINUX")
Odd = "say \"hi\"\n"
'''


def test_literals_are_parsed_and_expressions_kept_as_text():
    ad = classad.parse_ad(JOB_AD)
    assert ad["clusterid"] == 12 and ad["vmimage"] == "debian-12" and ad["vmloaderroot"] is True
    assert ad["odd"] == 'say "hi"\n'
    assert isinstance(ad["requirements"], classad.Expr)
    assert isinstance(ad["requestdisk"], classad.Expr)


def test_quote_round_trips_through_parse():
    for value in ("plain", 'with "quotes" and \\ backslash', "line\nbreak", 7, 2.5, True):
        assert classad.parse_value(classad.quote(value)) == value


def test_a_job_ad_becomes_a_vm_request():
    req = vm_request(classad.parse_ad(JOB_AD))
    assert req.image == "debian-12" and req.root and req.snapshot == "on-failure"
    assert req.timeout == 600 and req.cpus == 2 and req.memory_mib == 2048
    assert req.outputs is None                      # no TransferOutput: every new file comes back
    assert req.env_names == ("A", "B", "C")
    assert req.label == "12.3"


def test_a_job_without_vm_image_is_not_a_vm_job():
    assert vm_request(classad.parse_ad("ClusterId = 1\nCmd = \"/bin/true\"\n")) is None


def test_transfer_output_names_the_outputs():
    req = vm_request(classad.parse_ad('VMImage = "debian-12"\nTransferOutput = "a.txt,b/c.log"\n'))
    assert req.outputs == ("a.txt", "b/c.log")


@pytest.mark.parametrize("line, words", [
    ("VMImage = 42", ["+VMImage must be a string", "a number"]),
    ('VMImage = ""', ["+VMImage must be a string"]),
    ('VMImage = "debian-12"\nVMLoaderRoot = "yes"', ["+VMLoaderRoot must be True or False", "'yes'"]),
    ('VMImage = "debian-12"\nVMLoaderSnapshot = "sometimes"', ["+VMLoaderSnapshot must be", "sometimes"]),
    ('VMImage = "debian-12"\nVMLoaderTimeout = -5', ["+VMLoaderTimeout must be a positive number"]),
])
def test_malformed_attributes_name_the_attribute_and_the_fix(line, words):
    with pytest.raises(JobAdError) as err:
        vm_request(classad.parse_ad(line))
    for word in words:
        assert word in err.value.message
    assert err.value.hint


def test_sandbox_inputs_skip_the_starters_own_files_and_keep_subdirs(tmp_path: Path):
    for name in (".job.ad", ".machine.ad", ".chirp.config", "_condor_stdout", "_condor_stderr",
                 "condor_exec.exe", "src.tar.gz", "data/in.txt", "tmp/x", "var/tmp/y"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "link").symlink_to("/etc/passwd")
    got = sorted(rel for _, rel in sandbox_inputs(tmp_path))
    assert got == ["condor_exec.exe", "data/in.txt", "src.tar.gz"]


def test_an_executable_from_the_sandbox_runs_from_the_guest_work_dir(tmp_path: Path):
    (tmp_path / "condor_exec.exe").write_text("#!/bin/sh\n")
    assert guest_command([str(tmp_path / "condor_exec.exe"), "a"], tmp_path) == ["./condor_exec.exe", "a"]
    assert guest_command(["/bin/echo", "hi"], tmp_path) == ["/bin/echo", "hi"]


def test_the_walltime_limit_times_the_vm_out_just_before_htcondor_does():
    assert vm_request(classad.parse_ad('VMImage = "debian-12"\nAllowedJobDuration = 3600')).timeout == 3540
    assert vm_request(classad.parse_ad('VMImage = "debian-12"\nAllowedJobDuration = 100')).timeout == 95
    explicit = 'VMImage = "debian-12"\nAllowedJobDuration = 3600\nVMLoaderTimeout = 10'
    assert vm_request(classad.parse_ad(explicit)).timeout == 10
    assert vm_request(classad.parse_ad('VMImage = "debian-12"')).timeout is None

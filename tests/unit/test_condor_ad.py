"""Reading job ads with HTCondor's ClassAd library: what a submit file asks of vmloader, requests
evaluated against the machine ad as the starter does, and clear errors for malformed attributes."""
from pathlib import Path

import classad2
import pytest

from vmloader.bootstrapper import classad
from vmloader.bootstrapper.condor import (MIN_GUEST_MEMORY_MIB, QEMU_OVERHEAD_MIB, JobAdError, guest_command,
                                          sandbox_inputs, vm_request)

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
DiskUsage = 5000
Environment = "A=1 B='two words' C=3"
Requirements = (TARGET.Arch == "X86_64") && (TARGET.OpSys == "LINUX")
Odd = "say \"hi\""
'''

# What condor_submit 23.9 writes for a job with no request_* lines (HTCondor's defaults, as
# condor_q -l shows them), and a slot's machine ad as the starter hands it over (.machine.ad).
DEFAULT_REQUESTS_AD = r'''
ClusterId = 7
ProcId = 0
VMImage = "debian-12"
ImageSize = 2500
DiskUsage = 2500
RequestCpus = 1
RequestDisk = DiskUsage
RequestMemory = ifthenelse(MemoryUsage =!= undefined,MemoryUsage,(ImageSize + 1023) / 1024)
'''
MACHINE_AD = r'''
Name = "slot1@vm1@worker"
Arch = "X86_64"
OpSys = "LINUX"
Cpus = 4
Memory = 3072
Disk = 10000000
VMLoaderCacheDir = "/var/cache/vmloader-1"
'''


def request(job_text: str, machine_text: str = MACHINE_AD):
    return vm_request(classad.parse_ad(job_text), classad.parse_ad(machine_text))


def test_values_come_from_htcondors_parser_and_expressions_are_evaluated():
    ad = classad.parse_ad(JOB_AD)
    assert ad.evaluate("ClusterId") == 12 and ad.evaluate("vmimage") == "debian-12"
    assert ad.evaluate("VMLoaderRoot") is True
    assert ad.evaluate("Odd") == 'say "hi"'
    assert ad.evaluate("RequestDisk") == 5000                   # DiskUsage, evaluated
    assert ad.evaluate("Missing") is classad.UNDEFINED
    machine = classad.parse_ad(MACHINE_AD)
    assert ad.evaluate("Requirements", machine) is True        # TARGET: the machine ad
    assert ad.evaluate("Requirements") is classad.UNDEFINED    # no TARGET: undefined, not the number 2


def test_quote_round_trips_through_htcondors_parser():
    """quote() writes new-syntax literals, as condor_chirp set_job_attr reads them."""
    for value in ("plain", 'with "quotes" and \\ backslash', "line\nbreak", 7, 2.5, True):
        assert classad2.ExprTree(classad.quote(value)).eval() == value


def test_a_line_htcondor_cannot_parse_spoils_only_its_own_attribute():
    ad = classad.parse_ad('VMImage = "debian-12"\nBroken = 3 +\nVMLoaderRoot = "yes"\n')
    assert ad.evaluate("VMLoaderRoot") == "yes"                 # a whole-file parse would lose this
    assert "Broken" in ad
    with pytest.raises(classad.AdError) as err:
        ad.evaluate("Broken")
    assert "Broken = '3 +'" in err.value.message


def test_a_broken_vm_attribute_holds_the_job_with_its_text():
    with pytest.raises(classad.AdError) as err:
        request('VMImage = "debian-12"\nVMLoaderTimeout = 3 *\n')
    assert "VMLoaderTimeout" in err.value.message and err.value.exit_code == 125


def test_declares_finds_an_attribute_without_parsing():
    assert classad.declares('ClusterId = 1\nvmimage = 42 +\n', "VMImage")
    assert not classad.declares('ClusterId = 1\nCmd = "VMImage = x"\n', "VMImage")


def test_htcondors_default_requests_are_evaluated_and_too_small_for_a_vm():
    """Left alone, HTCondor's default request_memory is the executable's size, ~3 MiB: the
    schedd transform replaces it for VM jobs; a job that still carries it is held."""
    assert classad.parse_ad(DEFAULT_REQUESTS_AD).evaluate("RequestMemory") == 3
    with pytest.raises(JobAdError) as err:
        request(DEFAULT_REQUESTS_AD)
    need = MIN_GUEST_MEMORY_MIB + QEMU_OVERHEAD_MIB
    assert "request_memory 3 MiB is too small for a VM of debian-12" in err.value.message
    assert f"at least {need} MiB" in err.value.message and err.value.hint


def test_the_vm_gets_the_evaluated_request_less_qemus_overhead():
    ad = DEFAULT_REQUESTS_AD.replace("RequestCpus = 1", "RequestCpus = TARGET.Cpus / 2").replace(
        "RequestMemory = ifthenelse", "RequestMemory = 1000 + 24 * 10\nOld = ifthenelse")
    req = request(ad)
    assert req.memory_mib == 1240 - QEMU_OVERHEAD_MIB and req.cpus == 2 and req.disk_kib == 2500
    transform_default = f"RequestMemory = 1024 + {QEMU_OVERHEAD_MIB}"   # what the schedd transform sets
    assert request(DEFAULT_REQUESTS_AD.replace("RequestMemory = ", transform_default + "\nOld = ")
                   ).memory_mib == 1024


def test_a_request_that_grew_with_memory_usage_sizes_the_next_run():
    ad = DEFAULT_REQUESTS_AD + "ResidentSetSize = 1500000\nMemoryUsage = ((ResidentSetSize + 1023) / 1024)\n"
    assert request(ad).memory_mib == (1500000 + 1023) // 1024 - QEMU_OVERHEAD_MIB


def test_the_vm_never_outgrows_the_slot():
    ad = JOB_AD.replace("RequestCpus = 2", "RequestCpus = 8").replace("RequestMemory = 2048", "RequestMemory = 8192")
    req = request(ad)
    assert req.cpus == 4 and req.memory_mib == 3072 - QEMU_OVERHEAD_MIB


def test_just_enough_memory_boots_and_one_mib_less_is_held():
    need = MIN_GUEST_MEMORY_MIB + QEMU_OVERHEAD_MIB
    assert request(f'VMImage = "debian-12"\nRequestMemory = {need}').memory_mib == MIN_GUEST_MEMORY_MIB
    with pytest.raises(JobAdError) as err:
        request(f'VMImage = "debian-12"\nRequestMemory = {need - 1}')
    assert f"request_memory {need - 1} MiB" in err.value.message and f"at least {need} MiB" in err.value.message


def test_without_requests_or_a_machine_ad_the_image_defaults_apply():
    req = vm_request(classad.parse_ad('VMImage = "debian-12"'))
    assert req.memory_mib is None and req.cpus is None and req.disk_kib is None


@pytest.mark.parametrize("line", ["RequestMemory = TARGET.NoSuchThing", 'RequestMemory = "lots"',
                                  "RequestCpus = 1 / 0"])
def test_a_request_that_is_not_a_number_holds_the_job(line):
    with pytest.raises(JobAdError) as err:
        request(f'VMImage = "debian-12"\n{line}')
    assert "not a number" in err.value.message and err.value.hint


def test_a_job_ad_becomes_a_vm_request():
    req = request(JOB_AD)
    assert req.image == "debian-12" and req.root and req.snapshot == "on-failure"
    assert req.timeout == 600 and req.cpus == 2 and req.memory_mib == 2048 - QEMU_OVERHEAD_MIB
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


def test_request_disk_less_the_sandbox_bounds_the_vms_overlay():
    from vmloader.bootstrapper.condor import disk_limit
    req = request(JOB_AD.replace("RequestDisk = DiskUsage", "RequestDisk = 2 * 1024 * 1024"))
    assert req.disk_kib == 2 * 1024 * 1024
    limit = disk_limit(req, sandbox_bytes=3 * 1024 * 1024)
    assert limit.limit_bytes == (2048 - 3) * 2 ** 20
    assert limit.origin == "request_disk 2097152 KiB less the sandbox's 3072 KiB"
    assert disk_limit(request('VMImage = "debian-12"'), 1000) is None      # no request: no bound


def test_request_disk_never_exceeds_the_slots_disk():
    req = request(JOB_AD.replace("RequestDisk = DiskUsage", "RequestDisk = 99999999"))
    assert req.disk_kib == 10000000                            # the slot's Disk


def test_htcondors_default_request_disk_is_too_small_for_a_vm_and_held_with_the_numbers():
    """condor_submit's default request_disk is the sandbox's size (DiskUsage, a few MiB): the
    schedd transform replaces it for VM jobs; a job that still carries it is held."""
    from vmloader.bootstrapper.condor import MIN_OVERLAY_MIB, disk_limit
    req = request(DEFAULT_REQUESTS_AD.replace("RequestMemory = ifthenelse", "RequestMemory = 1216\nOld = ifthenelse"))
    assert req.disk_kib == 2500
    with pytest.raises(JobAdError) as err:
        disk_limit(req, sandbox_bytes=2500 * 1024)
    assert "request_disk 2500 KiB is too small for a VM of debian-12" in err.value.message
    assert f"at least {MIN_OVERLAY_MIB} MiB" in err.value.message and "the sandbox's 2500 KiB" in err.value.message
    assert f"({MIN_OVERLAY_MIB * 1024 + 2500} KiB in all)" in err.value.message and err.value.exit_code == 125
    just = request(f'VMImage = "debian-12"\nRequestDisk = {MIN_OVERLAY_MIB * 1024 + 2500}')
    assert disk_limit(just, 2500 * 1024).limit_bytes == MIN_OVERLAY_MIB * 2 ** 20


def test_a_request_disk_expression_is_evaluated_against_the_machine():
    req = request(JOB_AD.replace("RequestDisk = DiskUsage", "RequestDisk = DiskUsage + TARGET.Disk / 10"))
    assert req.disk_kib == 5000 + 1000000


def test_the_vm_stays_within_the_jobs_cgroup_memory_limit_and_says_so_when_that_is_too_small():
    """QEMU runs in the job's cgroup: the guest is sized within its memory limit as within the slot."""
    ad = JOB_AD                                                  # RequestMemory = 2048
    assert vm_request(classad.parse_ad(ad), classad.parse_ad(MACHINE_AD), 1024 * 2 ** 20).memory_mib == \
        1024 - QEMU_OVERHEAD_MIB
    with pytest.raises(JobAdError) as err:
        vm_request(classad.parse_ad(ad), classad.parse_ad(MACHINE_AD), 300 * 2 ** 20)
    assert "request_memory 2048 MiB (the job's cgroup memory limit 300 MiB) is too small" in err.value.message


def test_the_cgroup_memory_limit_is_read_for_v1_and_v2(tmp_path):
    from vmloader.bootstrapper.cgroups import memory_limit_bytes
    v1 = tmp_path / "v1"
    (v1 / "memory/htcondor/job").mkdir(parents=True)
    (v1 / "memory/htcondor/job/memory.limit_in_bytes").write_text("3221225472\n")
    (tmp_path / "cg1").write_text("5:cpu,cpuacct:/htcondor/job\n4:memory:/htcondor/job\n")
    assert memory_limit_bytes(tmp_path / "cg1", v1) == 3 * 2 ** 30
    (v1 / "memory/htcondor/job/memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory_limit_bytes(tmp_path / "cg1", v1) is None          # v1's "unlimited"
    v2 = tmp_path / "v2"
    (v2 / "system.slice/job").mkdir(parents=True)
    (v2 / "system.slice/job/memory.max").write_text("max\n")
    (tmp_path / "cg2").write_text("0::/system.slice/job\n")
    assert memory_limit_bytes(tmp_path / "cg2", v2) is None
    (v2 / "system.slice/job/memory.max").write_text("1073741824\n")
    assert memory_limit_bytes(tmp_path / "cg2", v2) == 2 ** 30
    assert memory_limit_bytes(tmp_path / "missing", v2) is None


def test_oom_kills_are_counted_from_the_memory_cgroup(tmp_path):
    from vmloader.bootstrapper.cgroups import oom_kills
    (tmp_path / "memory/job").mkdir(parents=True)
    (tmp_path / "memory/job/memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (tmp_path / "cg").write_text("4:memory:/job\n")
    assert oom_kills(tmp_path / "cg", tmp_path) == 2
    (tmp_path / "job").mkdir()
    (tmp_path / "job/memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (tmp_path / "cg2").write_text("0::/job\n")
    assert oom_kills(tmp_path / "cg2", tmp_path) == 1
    assert oom_kills(tmp_path / "nothing", tmp_path) is None


def test_a_limit_set_on_an_ancestor_cgroup_applies(tmp_path):
    from vmloader.bootstrapper.cgroups import memory_limit_bytes
    (tmp_path / "memory/base/job").mkdir(parents=True)
    (tmp_path / "memory/base/job/memory.limit_in_bytes").write_text("3221225472\n")
    (tmp_path / "memory/base/job/memory.stat").write_text("cache 0\nhierarchical_memory_limit 419430400\n")
    (tmp_path / "cg").write_text("4:memory:/base/job\n")
    assert memory_limit_bytes(tmp_path / "cg", tmp_path) == 400 * 2 ** 20
    (tmp_path / "base/job").mkdir(parents=True)
    (tmp_path / "base/memory.max").write_text("419430400\n")
    (tmp_path / "base/job/memory.max").write_text("max\n")
    (tmp_path / "cg2").write_text("0::/base/job\n")
    assert memory_limit_bytes(tmp_path / "cg2", tmp_path) == 400 * 2 ** 20


def test_ending_the_private_libvirt_waits_for_its_daemons_and_removes_their_dir(tmp_path):
    """A daemon that keeps writing into the runtime dir while it exits (as libvirtd does) does not
    leave the dir behind: the wrapper waits for it before removing the dir."""
    import subprocess
    import sys
    from vmloader.bootstrapper.condor import _end_private_libvirt
    runtime = tmp_path / "vml-test"
    (runtime / "libvirt").mkdir(parents=True)
    daemon = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, time\n"
        "def bye(*_):\n"
        "    time.sleep(0.5); os.makedirs(%r, exist_ok=True); os._exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "open(%r, 'w').write('ready')\n"
        "while True: time.sleep(1)\n") % (str(runtime / "libvirt/common"), str(runtime / "ready"))])
    try:
        while not (runtime / "ready").exists():
            assert daemon.poll() is None
        (runtime / "libvirt/libvirtd.pid").write_text(f"{daemon.pid}\n")
        _end_private_libvirt(runtime)
        assert daemon.wait(timeout=5) == 0
        assert not runtime.exists()
    finally:
        daemon.kill()


def test_a_vm_in_a_slot_gets_the_bounded_translation_cache_its_overhead_counts_whatever_the_config_says(
        tmp_path):
    from vmloader.bootstrapper import config as config_mod, domain
    from vmloader.bootstrapper.condor import _job_spec
    cfg = config_mod.Config(cache_dir=tmp_path / "cache", state_dir=tmp_path / "state", tcg_tb_cache_mib=1024)
    spec = _job_spec(request(JOB_AD.replace("RequestDisk = DiskUsage", "RequestDisk = 2 * 1024 * 1024")),
                     ["/bin/true"], tmp_path, {}, cfg)
    assert spec.tb_cache_mib == domain.SLOT_TB_CACHE_MIB == 64
    assert QEMU_OVERHEAD_MIB >= domain.SLOT_TB_CACHE_MIB + 128      # QEMU's own 80-95 MiB (146 peak) beside it

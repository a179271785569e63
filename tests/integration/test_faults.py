"""Fault injection through real boots: each named failure ends with a clear outcome
(an infrastructure exit 125 naming the phase, never a job-like status), keeps the
output so far, the console log and the snapshot, and leaves no VM or overlay behind.

Each test records its fault's outcome with faulttable.record_row; `scripts/fault-table`
writes them into the table in `docs/reliability.md` as its own step.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest


from .conftest import domains_left, job_domain, world_readable_tmpdir
from .faulttable import record, record_row
from .nginx import free_port
from .reposerver import RepoServer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]


def start(vm_env, tmp_path, job_id: str, *command: str, root: bool = True) -> subprocess.Popen:
    argv = [sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12", "--json",
            "--job-id", job_id] + (["--root"] if root else []) + ["--", *command]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=vm_env, cwd=tmp_path,
                            stdin=subprocess.DEVNULL)


def wait_for_exec(state_dir: Path, job_id: str, proc: subprocess.Popen, marker: str = "") -> Path:
    job_dir = state_dir / "jobs" / job_id
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        phase = (job_dir / "phase").read_text().strip() if (job_dir / "phase").exists() else ""
        out = (job_dir / "stdout").read_text() if (job_dir / "stdout").exists() else ""
        if phase == "exec" and marker in out:
            return job_dir
        if proc.poll() is not None:
            raise AssertionError(f"the job ended early: {proc.stderr.read().decode()}")
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached its exec phase")


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, json.loads(out), err.decode()


def assert_infrastructure_failure(result: dict, job_dir: Path, *words: str) -> None:
    assert result["exit_status"] == 125 and result["outcome"] == "infrastructure-error", result
    assert result["error"]["phase"] == "exec", result["error"]
    for word in words:
        assert word in result["error"]["message"], result["error"]
    assert "not the command's own exit status" in result["error"]["hint"]
    assert (job_dir / "console.log").stat().st_size > 0
    assert result["snapshot"], "the default policy keeps a failed job's state"
    assert not (job_dir / "overlay.qcow2").exists()


def qemu_pid(job_dir: Path) -> int:
    return int(Path(f"/run/libvirt/qemu/{job_domain(job_dir)}.pid").read_text())


def test_qemu_killed_mid_job(vm_env, state_dir, tmp_path):
    proc = start(vm_env, tmp_path, "fault-qemu-kill", "sh", "-c", "echo before-the-fault; sleep 120")
    job_dir = wait_for_exec(state_dir, "fault-qemu-kill", proc, "before-the-fault")
    os.kill(qemu_pid(job_dir), signal.SIGKILL)
    code, result, err = finish(proc)
    assert code == 125
    assert_infrastructure_failure(result, job_dir, "the VM is gone")
    assert (job_dir / "stdout").read_text() == "before-the-fault\n"      # output so far is kept
    record("QEMU process killed (SIGKILL) mid-job", result, "output so far, console log, snapshot")


# A fault the job itself triggers inside the guest: (job id, command, marker to wait for,
# word the error must contain, table row, what is kept).
IN_GUEST_FAULTS = [
    ("fault-panic", "echo before-the-fault; sleep 1; echo c > /proc/sysrq-trigger; sleep 60", "before-the-fault",
     "Kernel panic", "guest kernel panic mid-job", "output so far, console log (with the panic), snapshot"),
    ("fault-agent-kill", "echo before-the-fault; kill -9 $PPID; sleep 60", "",
     "agent restarted", "agent process killed in the guest", "output so far, console log, snapshot"),
    ("fault-agent-stop", "echo before-the-fault; kill -STOP $PPID; sleep 60", "",
     "no heartbeat", "guest hangs hard (agent stopped: no heartbeat)", "output so far, console log, snapshot"),
]


@pytest.mark.parametrize("job_id, command, marker, word, fault, kept", IN_GUEST_FAULTS,
                         ids=[f[0] for f in IN_GUEST_FAULTS])
def test_a_fault_inside_the_guest(vm_env, state_dir, tmp_path, job_id, command, marker, word, fault, kept):
    proc = start(vm_env, tmp_path, job_id, "sh", "-c", command)
    job_dir = wait_for_exec(state_dir, job_id, proc, marker)
    code, result, err = finish(proc)
    assert code == 125
    assert_infrastructure_failure(result, job_dir, word)
    record(fault, result, kept)


def restart_libvirtd() -> None:
    """End the libvirtd that `make test` started (by its pid file) and start it again."""
    pid = int(Path("/run/libvirtd.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    subprocess.run(["libvirtd", "-d"], check=True)


@pytest.mark.serial          # every other test's VM calls would see libvirtd go away
def test_libvirtd_restarted_mid_job(vm_env, state_dir, tmp_path):
    if not Path("/run/libvirtd.pid").exists():
        pytest.skip("libvirtd was not started by make test here (no /run/libvirtd.pid)")
    proc = start(vm_env, tmp_path, "fault-libvirtd", "sh", "-c", "echo before-the-fault; sleep 10; echo after")
    job_dir = wait_for_exec(state_dir, "fault-libvirtd", proc, "before-the-fault")
    restart_libvirtd()
    code, result, err = finish(proc)
    assert code == 0 and result["outcome"] == "succeeded", err   # the job talks to its agent, not libvirtd
    assert (job_dir / "stdout").read_text() == "before-the-fault\nafter\n"
    record_row(**{"fault": "libvirtd restarted mid-job", "exit": 0, "outcome": "succeeded", "phase": None,
                   "message": "(the job went on: the agent channel does not go through libvirtd)",
                   "kept": "the job's output; the VM torn down through a new libvirt connection"})


def test_a_daemon_outliving_the_command_does_not_block_teardown(vm_env, state_dir, tmp_path):
    started = time.monotonic()
    proc = start(vm_env, tmp_path, "fault-daemon", "sh", "-c", "sleep 1000 & echo spawned", root=False)
    code, result, err = finish(proc)
    assert code == 0 and result["outcome"] == "succeeded", err
    assert time.monotonic() - started < 600          # not held until the daemon's sleep 1000 ends
    record_row(**{"fault": "job forks a daemon that outlives the command", "exit": 0, "outcome": "succeeded",
                   "phase": None, "message": "", "kept": "nothing to keep (success, policy on-failure)"})


# -- 15. malformed job ad attributes, through the real `vmloader condor wrapper` --------------------

FAKE_CHIRP = """#!/bin/sh
# Records what the wrapper sets in the job ad (the real condor_chirp talks to the shadow).
printf '%s=%s\\n' "$2" "$3" >> "$(dirname "$0")/chirp.log"
"""

# (ad lines, the attribute named in the hold reason, table row)
MALFORMED_ADS = [
    ("VMImage = 42", "+VMImage must be a string", "job ad `+VMImage = 42`"),
    ('VMImage = "debian-12"\nVMLoaderRoot = "yes"', "+VMLoaderRoot must be True or False",
     'job ad `+VMLoaderRoot = "yes"`'),
    ('VMImage = "debian-12"\nVMLoaderSnapshot = "sometimes"', "+VMLoaderSnapshot must be",
     'job ad with an unknown snapshot policy (`+VMLoaderSnapshot = "sometimes"`)'),
    ('VMImage = "debian-12"\nRequestMemory = 200 + 100', "request_memory 300 MiB is too small for a VM of debian-12",
     "job ad with a request_memory too small for any VM (`request_memory = 200 + 100`)"),
]


def wrapper_env(vm_env: dict, tmp_path: Path, ad: str) -> tuple:
    """A starter's view of one job: its sandbox (with .chirp.config), its ad file, condor_chirp on PATH."""
    sandbox, bin_dir = tmp_path / "sandbox", tmp_path / "bin"
    sandbox.mkdir()
    bin_dir.mkdir()
    (sandbox / ".chirp.config").write_text("127.0.0.1 9 secret\n")
    (sandbox / ".job.ad").write_text(f"ClusterId = 7\nProcId = 0\n{ad}\n")
    chirp = bin_dir / "condor_chirp"
    chirp.write_text(FAKE_CHIRP)
    chirp.chmod(0o755)
    env = dict(vm_env, _CONDOR_JOB_AD=str(sandbox / ".job.ad"), _CONDOR_SCRATCH_DIR=str(sandbox),
               PATH=f"{bin_dir}:{vm_env['PATH']}")
    return sandbox, bin_dir / "chirp.log", env


@pytest.mark.parametrize("ad, words, fault", MALFORMED_ADS, ids=["image-number", "root-string", "policy",
                                                                    "memory-too-small"])
def test_a_malformed_job_ad_puts_the_job_on_hold_without_running_it(vm_env, state_dir, tmp_path, ad, words, fault):
    sandbox, chirp_log, env = wrapper_env(vm_env, tmp_path, ad)
    marker = tmp_path / "the-job-ran"
    run = subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", "condor", "wrapper", "--",
                          "touch", str(marker)], capture_output=True, text=True, env=env, cwd=sandbox, timeout=120)
    assert run.returncode == 125, run.stderr
    held = dict(line.split("=", 1) for line in chirp_log.read_text().splitlines())
    reason = json.loads(held["VMLoaderHoldReason"])        # a ClassAd string literal is a JSON string here
    assert "[job ad]" in reason and words in reason and "hint:" in reason, reason
    assert "[job ad]" in run.stderr and words in run.stderr
    assert not marker.exists()                              # never run on the host instead
    assert not (state_dir / "jobs").exists()                # no job dir, so no VM, overlay or snapshot
    assert sorted(p.name for p in sandbox.iterdir()) == [".chirp.config", ".job.ad"]
    record_row(**{"fault": fault, "exit": 125, "outcome": "held (VMLoaderHoldReason)", "phase": "job ad",
                   "message": reason, "kept": "the job (on hold, not run); nothing booted"})


# -- what a fault must not leave behind, beyond `no_leftovers` ------------------------------------

def qemu_processes(job_id: str) -> list:
    """Pids of any process whose command line names this job's domain (QEMU's -name guest=...)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"vmloader-{job_id}".encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def assert_nothing_left(job_id: str, *roots: Path) -> None:
    assert domains_left({f"vmloader-{job_id}"}) == set()
    assert qemu_processes(job_id) == []
    for root in roots:                 # no partial download; no disk layer outside the snapshot store
        assert list(root.rglob("*.part")) == []   # but a whole warm state (the job built it to start warm)
        layers = [p.relative_to(root) for p in root.rglob("*.qcow2") if "snapshots" not in p.relative_to(root).parts]
        assert [p for p in layers if p.parts[0] != "warm" or not (root / p.parent / "meta.json").exists()] == []


def run_json(env: dict, cwd: Path, job_id: str, *args: str, timeout: float = 900) -> tuple:
    """`vmloader run --json` to the end: (exit code, result, stderr)."""
    argv = [sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--json", "--job-id", job_id, *args]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return done.returncode, json.loads(done.stdout), done.stderr


def assert_infra_before_boot(result: dict, phase: str, *words: str) -> None:
    """A failure before any VM existed: 125 naming the phase, no snapshot, no command status."""
    assert result["exit_status"] == 125 and result["outcome"] == "infrastructure-error", result
    assert result["error"]["phase"] == phase, result["error"]
    for word in words:
        assert word in result["error"]["message"], result["error"]
    assert result["snapshot"] is None and result["timings"].get("exec") is None


# -- 8 and 9. repository unreachable; truncated and bit-flipped images, in the repository and cached --

@pytest.fixture
def repo_server(published_repo):
    server = RepoServer(published_repo).start()
    yield server
    server.stop()


@pytest.fixture
def fresh_cache():
    cache = world_readable_tmpdir("vmloader-faultcache-")
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


def worker_env(vm_env: dict, cache: Path, repository: str) -> dict:
    return dict(vm_env, VMLOADER_CACHE_DIR=str(cache), VMLOADER_REPOSITORY=repository)


def pull_into(env: dict) -> None:
    done = subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", "images", "pull", "debian-12"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr


def published_disk(published_repo: Path) -> dict:
    """The disk artifact's manifest record: url, sha256, size."""
    [entry] = json.loads((published_repo / "manifest.json").read_text())["images"]
    return entry["artifacts"]["disk"]


def cached_disk(cache: Path, published_repo: Path) -> Path:
    return cache / "artifacts" / published_disk(published_repo)["sha256"]


def damage(path: Path, how: str) -> None:
    path.chmod(0o644)
    if how == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    else:
        with open(path, "r+b") as handle:
            handle.seek(path.stat().st_size // 2)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0x10]))


def test_repository_unreachable_and_the_image_not_cached(vm_env, state_dir, tmp_path, fresh_cache):
    down = f"http://127.0.0.1:{free_port()}/"                   # nothing listens there
    code, result, err = run_json(worker_env(vm_env, fresh_cache, down), tmp_path, "fault-repo-down",
                                 "--image", "debian-12", "--", "true")
    assert code == 125
    assert_infra_before_boot(result, "cache lookup", "is unreachable", down)
    assert_nothing_left("fault-repo-down", fresh_cache, state_dir)
    assert not (fresh_cache / "artifacts").exists() or list((fresh_cache / "artifacts").iterdir()) == []
    record("repository unreachable, image not cached", result, "the job record (nothing booted)")


def test_repository_unreachable_with_the_image_cached(vm_env, state_dir, tmp_path, fresh_cache, repo_server):
    env = worker_env(vm_env, fresh_cache, repo_server.url)
    pull_into(env)
    repo_server.stop()
    code, result, err = run_json(env, tmp_path, "fault-repo-down-cached", "--image", "debian-12", "--",
                                 "cat", "/etc/debian_version")
    assert code == 0 and result["outcome"] == "succeeded", err
    assert Path(result["stdout_path"]).read_text().startswith("12.")
    assert_nothing_left("fault-repo-down-cached", fresh_cache)
    record_row(**{"fault": "repository unreachable, image cached", "exit": 0, "outcome": "succeeded",
                   "phase": None, "message": "(the job ran from the cache and the saved manifest)",
                   "kept": "the job's output"})


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_a_damaged_disk_in_the_repository_is_refused_before_boot(vm_env, state_dir, tmp_path, fresh_cache,
                                                                  published_repo, how):
    bad = world_readable_tmpdir("vmloader-badrepo-")
    try:
        shutil.copytree(published_repo, bad, dirs_exist_ok=True, copy_function=os.link)
        disk = published_disk(published_repo)
        path = bad / disk["url"]
        path.unlink()
        shutil.copyfile(published_repo / disk["url"], path)        # its own inode: the original stays intact
        damage(path, how)
        server = RepoServer(bad).start()
        try:
            code, result, err = run_json(worker_env(vm_env, fresh_cache, server.url), tmp_path,
                                         f"fault-repo-{how}", "--image", "debian-12", "--", "true")
        finally:
            server.stop()
    finally:
        shutil.rmtree(bad, ignore_errors=True)
    assert code == 125
    assert_infra_before_boot(result, "cache lookup", "sha256 mismatch", f"expected {disk['sha256']}")
    assert not (fresh_cache / "artifacts" / disk["sha256"]).exists()     # never cached, never booted
    assert_nothing_left(f"fault-repo-{how}", fresh_cache, state_dir)
    record(f"{how} disk image in the repository", result, "the job record; the bad download is deleted")


def test_a_bit_flipped_cached_disk_is_dropped_not_booted(vm_env, state_dir, tmp_path, fresh_cache,
                                                         repo_server, published_repo):
    env = worker_env(vm_env, fresh_cache, repo_server.url)
    pull_into(env)
    repo_server.stop()                                       # nowhere to fetch a good copy from
    disk = cached_disk(fresh_cache, published_repo)
    damage(disk, "bit-flipped")
    code, result, err = run_json(env, tmp_path, "fault-cache-flip", "--image", "debian-12", "--", "true")
    assert code == 125
    assert_infra_before_boot(result, "cache lookup", "was damaged", "has been removed", "fetching it again failed")
    assert not disk.exists()
    assert_nothing_left("fault-cache-flip", fresh_cache, state_dir)
    record("bit-flipped disk image already in the cache (repository down)", result,
           "the job record; the damaged file is removed")


def test_a_truncated_cached_disk_is_fetched_again(vm_env, state_dir, tmp_path, fresh_cache, repo_server,
                                                  published_repo):
    env = worker_env(vm_env, fresh_cache, repo_server.url)
    pull_into(env)
    disk = cached_disk(fresh_cache, published_repo)
    damage(disk, "truncated")
    code, result, err = run_json(env, tmp_path, "fault-cache-trunc", "--image", "debian-12", "--", "true")
    assert code == 0 and result["outcome"] == "succeeded", err
    assert disk.stat().st_size == published_disk(published_repo)["size"]      # a whole, verified copy again
    assert_nothing_left("fault-cache-trunc", fresh_cache)
    record_row(**{"fault": "truncated disk image already in the cache (repository up)", "exit": 0,
                   "outcome": "succeeded", "phase": None,
                   "message": "(the damaged file was dropped, fetched again and verified)", "kept": "the job's output"})


# -- 7. the host disk fills: during a download, and under a job's overlay -------------------------

@contextmanager
def small_filesystem(kind: str, size_mib: int):
    """A tmpfs, or an ext4 on a loop device (root may use its 5% reserve, QEMU as libvirt-qemu may not)."""
    mount_point = world_readable_tmpdir(f"vmloader-full-{kind}-")
    image = mount_point.with_suffix(".img")
    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(mount_point)],
                       check=True)
    else:
        with open(image, "wb") as handle:
            handle.truncate(size_mib * 2 ** 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], check=True)
        os.chmod(mount_point, 0o755)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
        mount_point.rmdir()
        image.unlink(missing_ok=True)


def test_the_cache_disk_filling_up_during_a_download(vm_env, state_dir, tmp_path, repo_server):
    with small_filesystem("tmpfs", 32) as cache:
        code, result, err = run_json(worker_env(vm_env, cache, repo_server.url), tmp_path, "fault-cache-full",
                                     "--image", "debian-12", "--", "true")
        assert code == 125
        assert_infra_before_boot(result, "cache lookup", "disk filled up while downloading",
                                 "partial file was removed")
        assert "free space in" in result["error"]["hint"]
        assert_nothing_left("fault-cache-full", cache, state_dir)
        assert list((cache / "artifacts").iterdir()) == []
    record("host disk fills during an image download", result, "the job record (nothing booted)")


def test_the_state_disk_filling_up_under_the_overlay(vm_env, tmp_path):
    """The guest writes more than the job's filesystem holds: QEMU pauses the VM; the job must not hang."""
    with small_filesystem("ext4", 96) as state:
        env = dict(vm_env, VMLOADER_STATE_DIR=str(state / "state"))
        started = time.monotonic()
        code, result, err = run_json(env, tmp_path, "fault-state-full", "--image", "debian-12", "--root", "--",
                                     "sh", "-c", "echo before-the-fault; dd if=/dev/urandom of=/fill bs=1M "
                                                 "count=400 2>&1; sync; echo after-the-fill")
        took = time.monotonic() - started
        job_dir = state / "state" / "jobs" / "fault-state-full"
        assert code == 125, err
        assert_infrastructure_failure(result, job_dir, "paused the VM on a disk write error",
                                      f"the filesystem holding {job_dir}", "is full")
        assert (job_dir / "stdout").read_text().startswith("before-the-fault\n")
        snapshot = state / "state" / "snapshots" / result["snapshot"]
        assert (snapshot / "disk.qcow2").stat().st_size > 32 * 2 ** 20          # the filled disk, kept
        assert_nothing_left("fault-state-full", state)
        assert took < 600
    record("host disk fills under a job's overlay (ext4, 96 MiB)", result,
           "output so far, console log, snapshot (the full overlay)")


# -- 13. a command that writes 1 GiB: the host's memory stays bounded ------------------------------

RSS_CAP_MIB = 160          # vmloader's own peak resident memory, whatever the command prints


def peak_rss_mib(proc: subprocess.Popen) -> float:
    """Poll the process's VmHWM (its peak RSS, kept by the kernel) until it exits (or 900 s pass)."""
    peak, deadline = 0, time.monotonic() + 900
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.terminate()
            pytest.fail("the job did not end within 900 s")
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.2)
    return peak / 1024


def test_a_gigabyte_of_output_keeps_the_hosts_memory_bounded(vm_env, state_dir, tmp_path):
    size = 2 ** 30
    proc = start(vm_env, tmp_path, "fault-1g", "sh", "-c", f"head -c {size} /dev/zero; echo done >&2", root=False)
    started = time.monotonic()
    peak = peak_rss_mib(proc)
    took = time.monotonic() - started
    code, result, err = finish(proc)
    assert code == 0 and result["outcome"] == "succeeded", err
    assert Path(result["stdout_path"]).stat().st_size == size
    assert Path(result["stderr_path"]).read_text() == "done\n"
    assert 0 < peak < RSS_CAP_MIB, f"vmloader's peak RSS was {peak:.0f} MiB"
    assert_nothing_left("fault-1g", state_dir)
    record_row(**{"fault": "command writes 1 GiB to stdout", "exit": 0, "outcome": "succeeded", "phase": None,
                   "message": f"(vmloader's peak RSS {peak:.0f} MiB, cap {RSS_CAP_MIB} MiB; {took:.0f} s)",
                   "kept": "the whole output (in the job dir, as --json captures it)"})


# -- 12. hostile stage-out: escaping names, symlinks out of the work dir, a never-ending file -------

def tree(root: Path) -> dict:
    """Every path under root (not followed through symlinks) with its kind and content."""
    found = {}
    for path in sorted(root.rglob("*")):
        found[str(path.relative_to(root))] = (os.readlink(path) if path.is_symlink()
                                              else path.read_bytes() if path.is_file() else "dir")
    return found


def test_an_output_name_escaping_the_work_dir_is_refused_before_boot(vm_env, state_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12",
                          "--json", "--job-id", "fault-dotdot", "--output", "../escaped", "--", "true"],
                         capture_output=True, text=True, env=vm_env, cwd=tmp_path, timeout=120)
    error = json.loads(run.stdout)
    assert run.returncode == 125 and "escapes the job's work dir" in error["message"]
    assert not (state_dir / "jobs").exists() and not (tmp_path.parent / "escaped").exists()
    record_row(**{"fault": "stage-out name with `..` (`--output ../escaped`)", "exit": 125,
                   "outcome": "usage error, before boot", "phase": error["phase"], "message": error["message"],
                   "kept": "nothing booted; nothing written"})


def test_hostile_outputs_never_write_outside_the_output_dir(vm_env, state_dir, tmp_path):
    """The job (root in the guest) offers symlinks out of /work and an endless file; the host's output
    dir holds a symlink planted where an output would land. Only plain new files come back."""
    out, victim = tmp_path / "out", tmp_path / "victim-target"
    out.mkdir()
    victim.write_text("original\n")
    (out / "planted").symlink_to(victim)
    outside = {k: v for k, v in tree(tmp_path).items() if not k.startswith("out")}
    script = ("cd /work && echo fine > plain.txt && echo hostile > planted && ln -s /etc/shadow shadow-link "
              "&& ln -s /dev/zero endless && echo before-the-fault")
    code, result, err = run_json(dict(vm_env, VMLOADER_OUTPUT_MAX_BYTES="32M"), tmp_path, "fault-stage-out",
                                 "--image", "debian-12", "--root", "--output-new", "--output", "endless",
                                 "--output", "planted", "--output-dir", str(out), "--", "sh", "-c", script)
    assert code == 0 and result["outcome"] == "succeeded", err
    assert "refusing to copy back 'planted'" in err and "is a symlink" in err
    assert "endless: the guest sent more than the 33554432 byte limit; transfer aborted" in err
    assert {e["output"] for e in result["output_errors"]} == {"planted", "endless"}     # scripts see it too
    assert tree(out) == {"plain.txt": b"fine\n", "planted": str(victim)}     # no link, no endless, no part file
    assert victim.read_text() == "original\n"
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("out")} == outside
    assert_nothing_left("fault-stage-out", state_dir)
    record_row(**{"fault": "hostile stage-out: symlinks to /etc/shadow and /dev/zero in /work, a host symlink "
                            "planted in the output dir", "exit": 0, "outcome": "succeeded (command's status)",
                   "phase": "collect", "message": "refused: planted is a symlink; endless cut off at the 32 MiB "
                                                  "output_max_bytes; the guest's symlinks are not collected",
                   "kept": "the plain new file only; nothing written outside the output dir"})


# -- 10. concurrency: one job id twice at once; four jobs on two cores ------------------------------

def test_the_same_job_id_twice_at_once_one_fails_clearly(vm_env, state_dir, tmp_path):
    procs = [start(vm_env, tmp_path, "fault-same-id", "sh", "-c", "sleep 5; echo mine", root=False)
             for _ in range(2)]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        outcomes.append((proc.returncode, json.loads(out), err.decode()))
    outcomes.sort(key=lambda o: o[0])
    (won, result, _), (lost, error, lost_err) = outcomes
    assert won == 0 and result["outcome"] == "succeeded"
    assert lost == 125 and error["phase"] == "setup", error
    assert "job id fault-same-id was already used" in error["message"] and "--job-id" in error["hint"]
    assert (state_dir / "jobs" / "fault-same-id" / "stdout").read_text() == "mine\n"   # not disturbed
    assert_nothing_left("fault-same-id", state_dir)
    record_row(**{"fault": "two jobs with the same job id (same job dir) at once", "exit": "0 and 125",
                   "outcome": "one succeeded; the other refused before boot", "phase": error["phase"],
                   "message": error["message"], "kept": "the first job's output, untouched"})


def test_four_concurrent_jobs_on_two_cores_all_succeed(vm_env, state_dir, tmp_path):
    started = time.monotonic()
    ids = [f"fault-four-{n}" for n in range(4)]
    procs = [start(vm_env, tmp_path, job_id, "sh", "-c", f"echo {job_id}; sleep 2", root=False) for job_id in ids]
    results = [finish(proc, timeout=900) for proc in procs]
    took = time.monotonic() - started
    for job_id, (code, result, err) in zip(ids, results):
        assert code == 0 and result["outcome"] == "succeeded", err
        assert Path(result["stdout_path"]).read_text() == f"{job_id}\n"
        assert_nothing_left(job_id, state_dir)
    record_row(**{"fault": f"4 concurrent jobs on {os.cpu_count()} cores", "exit": 0, "outcome": "succeeded (all 4)",
                   "phase": None, "message": f"(wall time {took:.0f} s for all four, TCG)",
                   "kept": "each job's own output"})


# -- 12. a hostile agent: the job takes over the channel from inside a real guest ----------------------

HOSTILE = [  # mode, what the host says, table text
    ("names", "the guest agent restarted", "offers `../escaped`, `/etc/cron.d/evil`, `sub/../../x` as new outputs"),
    ("endless", "the guest sent more than the 8388608 byte limit", "a never-ending file transfer"),
    ("bad-checksum", "frame checksum mismatch", "a frame with a bad checksum"),
    ("oversized", "exceeds the 1048576 byte limit", "a frame header claiming 2 GiB"),
    ("wrong-id", "frame for unknown request", "data for a request id the host never used"),
    ("unknown-type", "unknown frame type 63", "a frame of an unknown type"),
]


@pytest.mark.parametrize("mode, said, what", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_agent_in_a_real_guest_cannot_write_outside_the_output_dir(vm_env, state_dir, tmp_path,
                                                                              mode, said, what):
    out = tmp_path / "out"
    out.mkdir()
    hostile = Path(__file__).with_name("hostile_agent.py")
    job_id = f"fault-hostile-{mode}"
    outputs = ["--output-new"] if mode == "names" else ["--output", "result.bin"]
    before_outside = {k: v for k, v in tree(tmp_path).items() if not k.startswith("out")}
    started = time.monotonic()
    code, result, err = run_json(dict(vm_env, VMLOADER_OUTPUT_MAX_BYTES="8M"), tmp_path, job_id,
                                 "--image", "debian-12", "--root", "--input", str(hostile), *outputs,
                                 "--output-dir", str(out), "--", "python3", "hostile_agent.py", mode)
    took = time.monotonic() - started
    assert code == 125 and result["outcome"] == "infrastructure-error", (result, err)
    assert "not the command's own exit status" in result["error"]["hint"]
    assert said in result["error"]["message"] + err, (result["error"], err)
    assert set(tree(out)) <= {"fine.txt"}                     # at most the one sane name; no part files
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("out")} == before_outside
    assert not (tmp_path / "escaped").exists() and not Path("/etc/cron.d/evil").exists()
    assert took < 600, "a hostile guest must not stall the job"
    assert_nothing_left(job_id, state_dir)
    record_row(**{"fault": f"hostile agent (a root job replaces it in the guest): {what}", "exit": code,
                   "outcome": result["outcome"], "phase": result["error"]["phase"],
                   "message": result["error"]["message"] + ("; collect: " + said if said not in
                                                             result["error"]["message"] else ""),
                   "kept": "nothing outside the output dir" + ("; fine.txt only" if mode == "names" else "")
                           + "; console log, snapshot"})

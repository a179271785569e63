"""Warm start through real libvirt + QEMU: jobs restore a saved, agent-ready state of the image.

The states live in the test cache's `warm/` (root's jobs); the first job of this module may build
them. Each test says which state it needs and makes it so (dropping or damaging lanes), so the
order only saves boots.
"""
import contextlib
import io
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmloader.bootstrapper import config, privatefiles, warm
from vmloader.bootstrapper.agentclient import AgentClient
from vmloader.bootstrapper.errors import AgentError

from .conftest import (as_user, domains_left, ensure_user, libvirt_domains, next_line,
                       world_readable_tmpdir)
from .faulttable import record_row
from .reposerver import RepoServer

# The tests here damage, drop and count the lanes of their shape: one after another (`make test`
# runs a module's tests on one worker).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers", "warm_start_on")]


@pytest.fixture
def warm_start_on(vm_env):
    """Warm start is the default (config `warm_start`); these tests ask for it, whatever the config says."""
    vm_env["VMLOADER_WARM_START"] = "true"

# The guest's clock just before and just after the host says what time it is (on stdin): a guest
# whose clock is right has the host's time between the two; then what makes a machine itself.
PROBE = ("date +%s.%N; read host_now; date +%s.%N; hostname; cat /etc/machine-id; "
         "cat /proc/sys/kernel/random/uuid; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo")


# This module's jobs have a shape of their own (warm states are per shape), so the lanes it drops,
# damages and counts are its own: the rest of the suite starts warm too, from the default shape's.
MEMORY_MIB = 768
SHAPE = ("--memory", str(MEMORY_MIB))
_OURS: set = set()          # the state dirs found for SHAPE (their key does not change in a run)


def lanes() -> list:
    """This module's lanes: those of the states saved for SHAPE (found by their meta.json)."""
    root = warm.warm_root(config.load())
    found = []
    for state in sorted(root.iterdir()) if root.is_dir() else []:
        for meta in state.glob("lane-*/meta.json"):
            with contextlib.suppress(OSError, ValueError):
                if json.loads(meta.read_text())["parts"].get("memory_mib") == MEMORY_MIB:
                    _OURS.add(state.name)
        if state.name in _OURS:
            found += sorted(state.glob("lane-*"))
    return found


def unusable_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("vmloader: warm state for")]


def no_warm_domain_left() -> bool:
    names = {warm.Lane(lane, lane.parent.name, int(lane.name[5:])).domain_name for lane in lanes()}
    return not domains_left(names)


def start_probe(vm_env, cwd: Path, job_id: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12", *SHAPE,
            "--snapshot", "never", "--job-id", job_id, "--", "sh", "-c", PROBE]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=vm_env, cwd=cwd)


def finish_probe(proc: subprocess.Popen, state_dir: Path, job_id: str) -> dict:
    first = next_line(proc)
    host_now = time.time()
    proc.stdin.write(f"{host_now}\n".encode())
    proc.stdin.flush()
    rest, err = proc.communicate(timeout=900)
    assert proc.returncode == 0 and first, err.decode()
    second, hostname, machine_id, uuid, random = rest.decode().split()
    meta = json.loads((state_dir / "jobs" / job_id / "metadata.json").read_text())
    return {"before": float(first), "host": host_now, "after": float(second), "hostname": hostname,
            "machine_id": machine_id, "uuid": uuid, "random": random, "start": meta["start"], "err": err.decode()}


def test_warm_started_jobs_run_at_once_and_are_each_their_own_machine(vm_env, state_dir, tmp_path):
    ids = ("warm-probe-a1", "warm-probe-b2", "warm-probe-c3")
    together = [start_probe(vm_env, tmp_path, job_id) for job_id in ids[:2]]     # two at once: two lanes
    seen = [finish_probe(proc, state_dir, job_id) for proc, job_id in zip(together, ids)]
    seen.append(finish_probe(start_probe(vm_env, tmp_path, ids[2]), state_dir, ids[2]))   # reuses a lane
    assert [s["start"] for s in seen] == ["warm"] * 3, [s["err"] for s in seen]
    assert len([lane for lane in lanes() if (lane / "meta.json").exists()]) >= 2
    for job_id, s in zip(ids, seen):
        assert s["hostname"] == f"vm-{job_id[-6:]}"
        assert s["before"] - 1 <= s["host"] <= s["after"] + 1, s        # the guest's clock is the host's
    for key in ("machine_id", "uuid", "random"):
        assert len({s[key] for s in seen}) == 3, (key, seen)
    assert no_warm_domain_left()


def damage(how: str) -> None:
    """Damage lane 0 of every warm state and drop the other lanes (so the next job takes lane 0)."""
    for lane in lanes():
        if lane.name != "lane-0":
            shutil.rmtree(lane)
            continue
        memory = lane / "memory.save"
        if how == "flip":
            with open(memory, "r+b") as handle:
                handle.seek(memory.stat().st_size // 2)
                byte = handle.read(1)
                handle.seek(-1, os.SEEK_CUR)
                handle.write(bytes([byte[0] ^ 0x10]))
        else:
            os.truncate(memory, memory.stat().st_size // 3)


def run_true(vmloader, *extra: str, env_extra=None) -> tuple:
    run = vmloader("run", "--image", "debian-12", *SHAPE, "--snapshot", "never", "--json", *extra, "--", "true",
                   env_extra=env_extra)
    return run, (json.loads(run.stdout) if run.stdout else {})


def test_a_damaged_warm_state_is_dropped_the_job_boots_cold_and_the_next_rebuilds_it(vmloader):
    run, _ = run_true(vmloader)                     # make sure a state exists
    assert run.returncode == 0, run.err
    for how, fault in (("flip", "warm state's saved memory bit-flipped"),
                       ("truncate", "warm state's saved memory truncated")):
        damage(how)
        run, result = run_true(vmloader)
        assert run.returncode == 0 and result["start"] == "cold", run.err
        [line] = unusable_lines(run.err)
        assert line.startswith("vmloader: warm state for debian-12@") and "memory.save differs" in line, line
        assert line.endswith("booting cold and rebuilding it")
        assert no_warm_domain_left()
        record_row(fault, result["exit_status"], "succeeded, booted cold", "", line,
                   "nothing (the state is dropped; the next job rebuilds it)")
        run, result = run_true(vmloader)
        assert run.returncode == 0 and result["start"] == "warm", run.err
        assert "warm build" in result["timings"] and not unusable_lines(run.err)


def test_a_kept_snapshot_of_a_warm_job_reopens_without_its_lane(vmloader, state_dir):
    run = vmloader("run", "--image", "debian-12", *SHAPE, "--json", "--", "sh", "-c",
                   "echo kept > /work/marker; exit 3")
    result = json.loads(run.stdout)
    assert result["exit_status"] == 3 and result["start"] == "warm", run.err
    for lane in lanes():                             # the lane may be dropped or rebuilt at any time
        shutil.rmtree(lane)
    again = vmloader("snapshot", "exec", result["snapshot"], "--", "cat", "/work/marker")
    assert again.returncode == 0 and again.out == "kept\n", again.err
    cold = vmloader("run", "--image", "debian-12", *SHAPE, "--cold", "--snapshot", "never", "--json", "--", "true")
    assert json.loads(cold.stdout)["start"] == "cold" and not lanes()


# -- faults of a warm state: deleted while a job takes it, a full disk while saving one, a restored
# guest whose agent stays silent. Each job still runs (cold, with one line on stderr), nothing runs
# on afterwards, and no job restores a state that is not whole.

def ours_running(*names: str) -> list:
    """libvirt domains and processes (QEMU's -name guest=...) named for any of `names`."""
    found = sorted(domains_left(names))
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        found += [f"pid {entry.name}" for name in names if f"guest={name},".encode() in cmdline]
    return found


def lane_domains(root: Path) -> list:
    return [warm.Lane(lane, lane.parent.name, int(lane.name[5:])).domain_name for lane in root.glob("*/lane-*")]


def vmloader_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("vmloader:")]


def one_lane_left() -> Path:
    """A complete lane 0 (built by a job if need be), the only lane (so the next job takes it)."""
    for lane in lanes():
        if lane.name != "lane-0" or not (lane / "meta.json").exists():
            shutil.rmtree(lane)
    [lane] = lanes()
    return lane


# The job's overlay over a warm lane waits here until the test lets it go: the job then holds the
# lane's lock and has checked its files, and has not restored it yet.
HOLDING_QEMU_IMG = """#!/bin/sh
prev=
for arg; do
    [ "$prev" = -b ] && backing=$arg
    prev=$arg
done
case "$backing" in
    */warm/*/disk.qcow2) : > "{hold}/held"; read go < "{hold}/go" ;;
esac
exec {real} "$@"
"""


def test_a_warm_state_deleted_while_a_job_takes_it_is_dropped_and_the_job_boots_cold(vmloader, vm_env, state_dir,
                                                                                      tmp_path):
    run, result = run_true(vmloader)
    assert run.returncode == 0 and result["start"] == "warm", run.err
    lane = one_lane_left()
    hold, bin_dir = tmp_path / "hold", tmp_path / "bin"
    hold.mkdir()
    bin_dir.mkdir()
    os.mkfifo(hold / "go")
    shim = bin_dir / "qemu-img"
    shim.write_text(HOLDING_QEMU_IMG.format(hold=hold, real=shutil.which("qemu-img")))
    shim.chmod(0o755)
    env = dict(vm_env, PATH=f"{bin_dir}:{vm_env['PATH']}")
    proc = subprocess.Popen([sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12",
                             *SHAPE, "--snapshot", "never", "--json", "--job-id", "warm-deleted", "--", "echo", "ran"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (hold / "held").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1].decode()
            time.sleep(0.2)
        shutil.rmtree(lane)                         # the whole state, its lock file too
    finally:
        with open(hold / "go", "w") as go:          # (also if the test failed: never leave the job hanging)
            go.write("go\n")
    out, err = proc.communicate(timeout=900)
    result = json.loads(out)
    assert proc.returncode == 0 and result["start"] == "cold", err.decode()
    assert Path(result["stdout_path"]).read_text() == "ran\n"
    [line] = vmloader_lines(err.decode())
    assert line.startswith("vmloader: warm state for debian-12@"), line
    assert line.endswith("(its disk layer was removed after it was checked); booting cold and rebuilding it")
    assert ours_running(warm.Lane(lane, lane.parent.name, 0).domain_name, "vmloader-warm-deleted") == []
    assert not lane.exists() and lanes() == []      # nothing half there for a later job
    record_row("warm state deleted (files and lock) after a job took it, before its restore",
               result["exit_status"], "succeeded, booted cold", "overlay", line,
               "nothing (the next job builds the state again)")


def start_warm_build(vm_env, cwd: Path, shape: tuple, job_id: str, command: tuple) -> subprocess.Popen:
    """`vmloader run` of a shape with no warm state yet: its first job builds one."""
    return subprocess.Popen([sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12",
                             *shape, "--snapshot", "never", "--job-id", job_id, "--", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=vm_env, cwd=cwd,
                            stdin=subprocess.DEVNULL)


AGENT_STARTING = b"vmloader-init: starting agent"      # (printed before the guest's agent can answer)


def _paused_build_vm(proc: subprocess.Popen, job_dir: Path) -> str:
    """The VM of the warm build `proc` began, paused by the test as soon as libvirt runs it."""
    owner, domain = job_dir / "owner.json", ""
    deadline = time.monotonic() + 900
    while True:
        assert proc.poll() is None, f"the job ended before its warm build was seen: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no warm build's VM within 900 s"
        with contextlib.suppress(OSError, ValueError, KeyError):
            domain = json.loads(owner.read_text())["domain"]
        if domain.startswith("vmloader-warm-") and subprocess.run(     # (fails while it is still starting)
                ["virsh", "-c", "qemu:///system", "suspend", domain], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, timeout=120).returncode == 0:
            return domain
        time.sleep(0.1)


def paused_warm_build(vm_env, cwd: Path, jobs_dir: Path, shape: tuple, job_id: str, command: tuple) -> tuple:
    """`vmloader run` of a shape with no warm state yet, its build's VM paused before the guest began
    its agent: the build waits for an agent that cannot answer, so it has not saved the state and
    cannot while the test acts on it. (Paused too late, with the agent begun, the build could be
    saving: that job is let finish, its state dropped, and another begun.) (proc, job id, domain)."""
    for attempt in range(1, 4):
        attempt_id = job_id if attempt == 1 else f"{job_id}-{attempt}"
        proc = start_warm_build(vm_env, cwd, shape, attempt_id, command)
        domain = ""
        try:
            domain = _paused_build_vm(proc, jobs_dir / attempt_id)
            console = jobs_dir / attempt_id / "console.log"
            if not (console.exists() and AGENT_STARTING in console.read_bytes()):
                return proc, attempt_id, domain
            subprocess.run(["virsh", "-c", "qemu:///system", "resume", domain], stdout=subprocess.DEVNULL,
                           timeout=120)
            proc.communicate(timeout=900)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        finally:
            if proc.poll() is not None:
                drop_states(domain)
    raise AssertionError("three warm builds' guests began their agents before the test could pause them")


def saved_states(domain: str) -> list:
    """The lanes saved for the state of a warm build's VM (vmloader-warm-KEY12-STORE8-N)."""
    return list(warm.warm_root(config.load()).glob(f"{domain.split('-')[2]}*/lane-*/meta.json"))


def drop_states(domain: str) -> None:
    """The states of a warm build's shape: not kept for other runs."""
    root = warm.warm_root(config.load())
    for state in root.iterdir() if domain and root.is_dir() else []:
        if state.name.startswith(domain.split("-")[2]):
            shutil.rmtree(state, ignore_errors=True)


def test_a_vmloader_killed_while_it_builds_a_warm_state_leaves_no_vm_once_cleaned_up(vmloader, vm_env, state_dir,
                                                                                    tmp_path):
    """SIGKILL (the OOM killer, a node's daemon going) while the first job of a shape builds its warm
    state: the build's VM outlives vmloader; `vmloader cleanup` finds it by the job's owner.json
    and destroys it, and the next job of that shape builds the state again and starts warm."""
    shape = ("--memory", "704")                     # a shape of its own: its state is built now
    proc, job_id, domain = paused_warm_build(vm_env, tmp_path, state_dir / "jobs", shape, "warm-killed", ("true",))
    try:
        proc.kill()
        proc.wait()
        assert saved_states(domain) == []
        assert domain in libvirt_domains()          # the build's VM outlived its vmloader
        cleaned = vmloader("cleanup", "--json")
        assert cleaned.returncode == 0, cleaned.err
        [reaped] = cleaned.json()
        assert reaped["job_id"] == job_id and reaped["domain_destroyed"], reaped
        assert domains_left({domain}) == set()
        meta = json.loads((state_dir / "jobs" / job_id / "metadata.json").read_text())
        assert (meta["exit_status"], meta["outcome"]) == (125, "orphaned")
        again = vmloader("run", "--image", "debian-12", *shape, "--snapshot", "never", "--json", "--", "true")
        result = json.loads(again.stdout)
        assert again.returncode == 0 and result["start"] == "warm", again.err
        assert "warm build" in result["timings"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        drop_states(domain)
    record_row("vmloader killed (SIGKILL) while it builds a warm state", meta["exit_status"], "orphaned, cleaned up",
               "", "(vmloader cleanup destroyed the build's VM, named in the job's owner.json)",
               "the job record; the next job of the shape builds the state again")


def test_a_vmloader_stopped_while_it_builds_a_warm_state_ends_the_job_there_and_leaves_no_vm(vm_env, state_dir,
                                                                                            tmp_path):
    """SIGTERM (condor_rm, preemption, walltime) while the first job of a shape builds its warm
    state: the job ends there (143; before, the build took the signal for a failed build and the
    job booted cold and ran on with every later signal ignored), the build's VM is destroyed and
    nothing of the state is left."""
    proc, job_id, domain = paused_warm_build(vm_env, tmp_path, state_dir / "jobs", ("--memory", "688"),
                                             "warm-stopped", ("echo", "ran"))
    try:
        proc.terminate()
        out, err = proc.communicate(timeout=120)
        saved = saved_states(domain)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        drop_states(domain)
    text = err.decode()
    assert proc.returncode == 143 and "vmloader: [warm build] vmloader was stopped by SIGTERM" in text, text
    assert out == b"" and "boots cold" not in text
    assert saved == [] and domains_left({domain}) == set()
    meta = json.loads((state_dir / "jobs" / job_id / "metadata.json").read_text())
    assert meta["exit_status"] == 143 and meta["error"]["phase"] == "warm build"
    record_row("vmloader stopped (SIGTERM: condor_rm) while it builds a warm state", meta["exit_status"],
               meta["outcome"], meta["error"]["phase"], meta["error"]["message"],
               "the job record (the build's VM destroyed, its partial state dropped)")


def test_a_second_cache_warming_the_image_and_shape_of_a_running_warm_job_starts_warm_too(
        vmloader, vm_env, state_dir, tmp_path, published_repo):
    """Two caches on one libvirt daemon (a second vmloader instance, a test's cache beside root's)
    warming one image and shape: each lane's VM has a name of its own, so the second cache's build
    does not collide with the first cache's restored VM of lane 0."""
    run, _ = run_true(vmloader)
    assert run.returncode == 0, run.err
    lane = one_lane_left()
    argv = [sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12", *SHAPE,
            "--snapshot", "never", "--job-id", "warm-holder", "--", "sh", "-c", "echo up; read go; echo $go"]
    holder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=vm_env, cwd=tmp_path)
    other = world_readable_tmpdir("vmloader-warm-cache2-")
    server = None
    try:
        assert next_line(holder) == b"up\n"          # restored from lane 0, its VM running
        assert domains_left({warm.Lane(lane, lane.parent.name, 0).domain_name})
        server = RepoServer(published_repo).start()
        second = vmloader("run", "--image", "debian-12", *SHAPE, "--snapshot", "never", "--json", "--", "true",
                          env_extra={"VMLOADER_CACHE_DIR": str(other), "VMLOADER_REPOSITORY": server.url})
        result = json.loads(second.stdout) if second.stdout else {}
        assert second.returncode == 0 and result["start"] == "warm", second.err
        assert "warm build" in result["timings"], second.err
        assert [line for line in vmloader_lines(second.err) if "warm state" in line] == [], second.err
        out, err = holder.communicate(b"went\n", timeout=900)
        assert holder.returncode == 0 and out == b"went\n", err
    finally:
        if holder.poll() is None:
            holder.terminate()
            holder.wait(timeout=300)
        if server is not None:
            server.stop()
        assert ours_running(*lane_domains(other / "warm")) == []
        shutil.rmtree(other, ignore_errors=True)
    meta = json.loads((state_dir / "jobs" / "warm-holder" / "metadata.json").read_text())
    assert meta["start"] == "warm"


@pytest.fixture
def small_warm_root(own_cache):
    """This test's warm states on a 40 MiB tmpfs (room for a lane's disk layer, not for its memory), in
    a cache of its own: the shared cache's warm root stays as it is for the jobs of the tests that
    run beside this one (a tmpfs over it once made theirs run out of room too)."""
    root = own_cache / "warm"
    root.mkdir(mode=0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0755", "tmpfs", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_the_cache_disk_filling_up_while_a_warm_state_is_saved(vmloader, small_warm_root, published_repo):
    env = {"VMLOADER_CACHE_DIR": str(small_warm_root.parent), "VMLOADER_REPOSITORY": str(published_repo)}
    run, result = run_true(vmloader, env_extra=env)
    assert run.returncode == 0 and result["start"] == "cold", run.err
    [line] = vmloader_lines(run.err)
    assert line.startswith("vmloader: could not save a warm state for debian-12@") and "this job boots cold" in line
    assert "No space left on device" in line, line
    assert ours_running(*lane_domains(small_warm_root), f"vmloader-{result['job_id']}") == []
    left = sorted(p.name for p in small_warm_root.rglob("*") if not p.is_dir())
    assert left == ["lock", warm.NO_ROOM, warm.SHARE_LOCK], left   # the locks stay; no partial file, no completion record
    assert list(warm.WarmStore(small_warm_root, 8).states()) == []        # no state a later job could take
    again, second = run_true(vmloader, env_extra=env)         # no more room now: boots cold without trying
    assert again.returncode == 0 and second["start"] == "cold" and "warm build" not in second["timings"], again.err
    [no_room] = vmloader_lines(again.err)
    assert no_room.startswith("vmloader: no room for a warm state of debian-12@") and "free now" in no_room
    assert ours_running(*lane_domains(small_warm_root), f"vmloader-{second['job_id']}") == []
    record_row("the cache disk fills while a warm state is saved (tmpfs, 40 MiB)", result["exit_status"],
               "succeeded, booted cold", "warm build", line,
               "nothing (the partial state is removed; later jobs boot cold at once until more space is free)")


def resave_with_its_agent_stopped(lane: Path, scratch: Path) -> None:
    """Lane 0's state restored under test files, its agent stopped (SIGSTOP from a command it runs; the
    console says when), saved again and recorded as the lane's complete state: a guest that comes
    back from a good state file with an agent that never answers."""
    meta = json.loads((lane / "meta.json").read_text())
    memory = lane / "memory.save"
    virsh = ["virsh", "-q", "-c", "qemu:///system"]
    xml = ET.fromstring(subprocess.run([*virsh, "save-image-dumpxml", str(memory)], capture_output=True, text=True,
                                       check=True).stdout)
    for channel in xml.iter("channel"):
        source = channel.find("source")
        source.set("path", str(scratch / Path(source.get("path")).name))
    for log in xml.iter("log"):
        log.set("file", str(scratch / "console.log"))
    (scratch / "domain.xml").write_text(ET.tostring(xml, encoding="unicode"))
    name = xml.findtext("name")
    assert domains_left({name}) == set()          # (the lane's last job's VM: libvirt forgets it first)
    subprocess.run([*virsh, "restore", str(memory), "--xml", str(scratch / "domain.xml")], check=True)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(scratch / "agent.sock"))
        client = AgentClient(sock)
        client.handshake(timeout=120)
        stop = ["/bin/sh", "-c", "kill -STOP $PPID; echo VMLOADER-AGENT-STOPPED > /dev/console"]

        def never_answered() -> None:            # (ends when the VM is saved and the channel closes)
            with contextlib.suppress(AgentError):
                client.exec(stop, env={}, user="root", cwd="/", stdin=None, stdout=io.BytesIO(),
                            stderr=io.BytesIO())
        threading.Thread(target=never_answered, daemon=True).start()
        deadline = time.monotonic() + 120
        console = scratch / "console.log"
        while not (console.exists() and b"VMLOADER-AGENT-STOPPED" in console.read_bytes()):
            assert time.monotonic() < deadline, "the guest never said its agent was stopped"
            time.sleep(0.2)
        partial = lane / "memory.save.tmp"
        subprocess.run([*virsh, "save", name, str(partial)], check=True, stdout=subprocess.DEVNULL)
        client.close()
    finally:
        subprocess.run([*virsh, "destroy", name], capture_output=True)     # (gone already once saved)
    privatefiles.restrict(partial)
    os.rename(partial, memory)
    privatefiles.reclaim(lane / "disk.qcow2")
    warm.Lane(lane, meta["key"], 0).commit(meta["parts"], meta["image"])


def test_a_restored_guest_whose_agent_does_not_answer_is_dropped_and_the_job_boots_cold(vmloader, tmp_path):
    run, result = run_true(vmloader)
    assert run.returncode == 0 and result["start"] == "warm", run.err
    lane = one_lane_left()
    scratch = world_readable_tmpdir("vmloader-warm-silent-")
    try:
        resave_with_its_agent_stopped(lane, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    run, result = run_true(vmloader)
    assert run.returncode == 0 and result["start"] == "cold", run.err
    [line] = vmloader_lines(run.err)
    assert line.startswith("vmloader: warm state for debian-12@") and "its agent did not answer within" in line
    assert line.endswith("booting cold and rebuilding it"), line
    assert ours_running(warm.Lane(lane, lane.parent.name, 0).domain_name, f"vmloader-{result['job_id']}") == []
    assert not (lane / "memory.save").exists() and not (lane / "meta.json").exists()    # dropped
    record_row("a restored warm state whose agent does not answer (saved with its agent stopped)",
               result["exit_status"], "succeeded, booted cold", "boot", line,
               "nothing (the state is dropped; the next job rebuilds it)")


def test_a_users_job_restores_roots_shared_state_and_leaves_it_as_it_was(vmloader, readable_checkout):
    """Root (qemu:///system) and a user (qemu:///session) warming the same image: root's state in the
    shared cache is restored by the user's own session daemon, read-only."""
    run, _ = run_true(vmloader)                             # root: its state exists (built or checked)
    assert run.returncode == 0, run.err
    shared = [lane for lane in lanes() if (lane / "meta.json").exists()]
    assert shared
    before = {path: hashlib.sha256(path.read_bytes()).hexdigest() for lane in shared for path in lane.iterdir()}
    user = ensure_user("vmloader-test-warm")
    env = {"VMLOADER_CACHE_DIR": str(config.load().cache_dir), "VMLOADER_WARM_START": "true"}
    proc = as_user(user, readable_checkout, ["run", "--image", "debian-12", *SHAPE, "--json", "--snapshot", "never",
                                             "--", "sh", "-c", "hostname; id -u"], env)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["start"] == "warm" and "warm build" not in result["timings"], err
    assert not [line for line in err.splitlines() if line.startswith("vmloader:")], err
    hostname, uid = Path(result["stdout_path"]).read_text().split()
    assert hostname == f"vm-{result['job_id'][-6:]}" and uid == "1000"
    restored = (Path(result["job_dir"]) / "domain.xml").read_text()
    assert any(f"{lane}/disk.qcow2" in restored for lane in shared), restored     # root's lane, under the user's overlay
    assert not list(Path(user.pw_dir).glob(".cache/vmloader/warm/*/lane-*/meta.json"))   # nothing built of its own
    after = {path: hashlib.sha256(path.read_bytes()).hexdigest() for lane in shared for path in lane.iterdir()}
    assert after == before
    record_row("root (qemu:///system) and a user (qemu:///session) warming the same image", result["exit_status"],
               "succeeded, started warm from root's state", "", "",
               "root's state unchanged (sha256); the user's overlay in the user's job dir")

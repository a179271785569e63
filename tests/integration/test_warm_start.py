"""Warm start through real libvirt + QEMU: jobs restore a saved, agent-ready state of the image.

The states live in the test cache's `warm/` (root's jobs); the first job of this module may build
them. Each test says which state it needs and makes it so (dropping or damaging lanes), so the
order only saves boots.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmloader.bootstrapper import config, warm

from .conftest import as_user, ensure_user, libvirt_domains
from .faulttable import record_row

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers", "warm_start_on")]


@pytest.fixture
def warm_start_on(vm_env):
    """Warm start is opt-in (config `warm_start`): these tests turn it on for their jobs."""
    vm_env["VMLOADER_WARM_START"] = "true"

# The guest's clock just before and just after the host says what time it is (on stdin): a guest
# whose clock is right has the host's time between the two; then what makes a machine itself.
PROBE = ("date +%s.%N; read host_now; date +%s.%N; hostname; cat /etc/machine-id; "
         "cat /proc/sys/kernel/random/uuid; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo")


def lanes() -> list:
    root = warm.warm_root(config.load())
    return sorted(root.glob("*/lane-*")) if root.is_dir() else []


def unusable_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("vmloader: warm state for")]


def no_warm_domain_left() -> bool:
    names = {warm.Lane(lane, lane.parent.name, int(lane.name[5:])).domain_name for lane in lanes()}
    return not names & set(libvirt_domains())


def start_probe(vm_env, cwd: Path, job_id: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12", "--snapshot", "never",
            "--job-id", job_id, "--", "sh", "-c", PROBE]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=vm_env, cwd=cwd)


def finish_probe(proc: subprocess.Popen, state_dir: Path, job_id: str) -> dict:
    first = proc.stdout.readline()
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


def run_true(vmloader, *extra: str) -> tuple:
    run = vmloader("run", "--image", "debian-12", "--snapshot", "never", "--json", *extra, "--", "true")
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
    run = vmloader("run", "--image", "debian-12", "--json", "--", "sh", "-c", "echo kept > /work/marker; exit 3")
    result = json.loads(run.stdout)
    assert result["exit_status"] == 3 and result["start"] == "warm", run.err
    for lane in lanes():                             # the lane may be dropped or rebuilt at any time
        shutil.rmtree(lane)
    again = vmloader("snapshot", "exec", result["snapshot"], "--", "cat", "/work/marker")
    assert again.returncode == 0 and again.out == "kept\n", again.err
    cold = vmloader("run", "--image", "debian-12", "--cold", "--snapshot", "never", "--json", "--", "true")
    assert json.loads(cold.stdout)["start"] == "cold" and not lanes()


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
    proc = as_user(user, readable_checkout, ["run", "--image", "debian-12", "--json", "--snapshot", "never",
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

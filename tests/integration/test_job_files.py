"""Another local user on the worker reads none of a job's files, running or finished; a guest
cannot drop HTCondor's own sandbox files through output collection.

The attacker works as one would: the job's paths are in `ps` (QEMU's command line names
the overlay), and the job dir, the record and the snapshot are next to it.
"""
import grp
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from vmloader.bootstrapper import config

from .conftest import as_user, ensure_user, job_domain
from .faulttable import record_row

pytestmark = pytest.mark.integration

ATTACKER = "vmlt-jobfiles-b"
JOB_USER = "vmlt-jobfiles-a"

# Run as the attacker: try each path as it would (read a file, list a dir, connect to a socket).
PROBE = r"""
import json, os, socket, sys
seen = {}
for path in sys.argv[1:]:
    try:
        if path.endswith("/"):
            seen[path] = "listed: " + " ".join(sorted(os.listdir(path)))
        elif path.endswith(".sock"):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            seen[path] = "connected"
        else:
            with open(path, "rb") as f:
                seen[path] = "read %d bytes" % len(f.read(1 << 20))
    except OSError as exc:
        seen[path] = os.strerror(exc.errno) if exc.errno else str(exc)
print(json.dumps(seen))
"""


def attacker_tries(attacker, paths: list) -> dict:
    done = subprocess.run(["runuser", "-u", attacker.pw_name, "--", "/usr/bin/python3", "-c", PROBE, *paths],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/tmp", timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def overlay_from_ps(attacker, domain: str, owner: str) -> Path:
    """What any local user sees: QEMU's command line names the job's overlay. (A warm-started job's VM
    has its lane's name, which another libvirt daemon's VM restored from the same state also has: a
    user's session daemon restoring root's shared lane. The job's own QEMU is the one run by `owner`.)"""
    listing = subprocess.run(["runuser", "-u", attacker.pw_name, "--", "ps", "-ww", "-eo", "user:64=,args="],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
    rows = [row.split(None, 1) for row in listing.splitlines()]
    [line] = [row[1] for row in rows if len(row) == 2 and row[0] == owner
              and (f"guest={domain}," in row[1] or row[1].endswith(f"guest={domain}"))]
    return Path(re.search(r'"filename":"([^"]*overlay\.qcow2)"', line).group(1))


def wait_for_ready(job_dir: Path, proc: subprocess.Popen, deadline_s: float = 900) -> None:
    """The job's command prints `ready` (captured by --json in the job dir) once its secret is on disk."""
    deadline = time.monotonic() + deadline_s
    while not ((job_dir / "stdout").exists() and b"ready" in (job_dir / "stdout").read_bytes()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the job never printed ready"
        time.sleep(0.5)


def running_paths(job_dir: Path) -> list:
    return [str(job_dir) + "/", str(job_dir.parent) + "/", str(job_dir.parents[1]) + "/",
            *(str(job_dir / n) for n in ("overlay.qcow2", "console.log", "domain.xml", "owner.json", "phase",
                                         "stdout", "agent.sock", "attach-1.sock"))]


def finished_paths(job_dir: Path, snapshot: Path) -> list:
    return [str(job_dir) + "/", *(str(job_dir / n) for n in ("metadata.json", "stdout.tail", "stderr.tail",
                                                            "console.log", "stdout")),
            str(snapshot.parent) + "/", str(snapshot) + "/",
            *(str(snapshot / n) for n in ("disk.qcow2", "metadata.json", "console.log", "stdout.tail"))]


def modes(state: Path, job_id: str) -> set:
    """(kind, mode, group) of the state dirs and of all a job left in them (QEMU's sockets aside)."""
    found = {("dir", stat.S_IMODE(os.lstat(p).st_mode), os.lstat(p).st_gid)
             for p in (state, state / "jobs", state / "snapshots")}
    for dirpath, dirnames, filenames in [*os.walk(state / "jobs" / job_id), *os.walk(state / "snapshots" / job_id)]:
        info = os.lstat(dirpath)
        found.add(("dir", stat.S_IMODE(info.st_mode), info.st_gid))
        for name in filenames:
            info = os.lstat(os.path.join(dirpath, name))
            if not stat.S_ISSOCK(info.st_mode):
                found.add(("file", stat.S_IMODE(info.st_mode), None))
    return found


def secret_on_disk(path: Path, secret: bytes) -> bool:
    """As root: the guest's data really is in the file the attacker could not open."""
    return subprocess.run(["grep", "-qa", secret, str(path)]).returncode == 0


def job_command(secret: str) -> list:
    return ["sh", "-c", f"echo {secret} > /work/marker; sync; echo ready; exec sleep 1000"]


def test_another_user_reads_none_of_a_running_or_finished_root_job(vm_env, state_dir, no_leftovers):
    attacker = ensure_user(ATTACKER)
    # A state dir from an older vmloader: wide modes, an old record with a 0644 metadata file.
    old = state_dir / "jobs" / "old-job"
    old.mkdir(parents=True)
    (old / "metadata.json").write_text('{"secret": "old"}\n')
    for path, mode in ((state_dir, 0o755), (state_dir / "jobs", 0o711), (old, 0o711), (old / "metadata.json", 0o644)):
        os.chmod(path, mode)
    secret, job_id = "root-" + secrets.token_hex(8), "files-root-" + secrets.token_hex(3)
    proc = subprocess.Popen([sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12",
                             "--json", "--snapshot", "always", "--job-id", job_id, "--", *job_command(secret)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=vm_env, cwd="/tmp", text=True)
    job_dir = state_dir / "jobs" / job_id
    try:
        wait_for_ready(job_dir, proc)
        overlay = overlay_from_ps(attacker, job_domain(job_dir), "libvirt-qemu")    # qemu:///system's QEMU user
        assert overlay == job_dir / "overlay.qcow2"
        running = attacker_tries(attacker, running_paths(job_dir) + [str(old / "metadata.json")])
        assert secret_on_disk(overlay, secret.encode())
        status = subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", "status", "--json"],
                                stdout=subprocess.PIPE, env=vm_env, text=True, timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)          # the job ends the way condor_rm ends it: state kept
        out, err = proc.communicate(timeout=300)
    result = json.loads(out)
    assert result["snapshot"] == job_id, err
    assert job_id in status.stdout, status
    assert set(running.values()) == {"Permission denied"}, running
    snapshot = state_dir / "snapshots" / job_id
    finished = attacker_tries(attacker, finished_paths(job_dir, snapshot))
    assert set(finished.values()) == {"Permission denied"}, finished
    qemu_gid = grp.getgrnam("libvirt-qemu").gr_gid
    assert modes(state_dir, job_id) == {("dir", 0o710, qemu_gid), ("file", 0o600, None)}, modes(state_dir, job_id)
    assert "made" in err and "private" in err          # the old state dir was tightened, and it said so
    # The owner still has it all: the kept state boots again with the guest's file in it.
    again = subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", "snapshot", "exec", job_id, "--",
                            "cat", "/work/marker"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=vm_env,
                           cwd="/tmp", timeout=900, text=True)
    assert again.returncode == 0 and again.stdout.strip() == secret, again.stderr
    assert modes(state_dir, job_id) == {("dir", 0o710, qemu_gid), ("file", 0o600, None)}, modes(state_dir, job_id)
    assert os.stat(snapshot / "disk.qcow2").st_uid == 0
    record_row("another local user reads a running job's files (path from `ps`): root's job", "EACCES",
               "refused: overlay, console log, domain XML, owner and phase files, captured stdout, agent sockets, "
               "job dir and state dir listings", "", f"{overlay}: {running[str(overlay)]}",
               "the job ran on and its state was kept; the owner boots it again")
    record_row("another local user reads a finished job's record and snapshot: root's job", "EACCES",
               "refused: metadata, output tails, console log, snapshot disk and metadata, listings; an older "
               "vmloader's wider state dir is tightened at the next job", "",
               f"{snapshot / 'disk.qcow2'}: {finished[str(snapshot / 'disk.qcow2')]}",
               "dirs 0710 root:libvirt-qemu (QEMU may search), files 0600")


def _vmloader_pid(runuser: subprocess.Popen) -> int:
    """The vmloader started under runuser (env execs python3), to stop it as condor_rm would."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in psutil.Process(runuser.pid).children(recursive=True):
            if "vmloader.bootstrapper.cli" in " ".join(child.cmdline()):
                return child.pid
        time.sleep(0.2)
    raise AssertionError("vmloader never started under runuser")


def test_another_user_reads_none_of_a_running_or_finished_unprivileged_job(readable_checkout, built_image):
    user, attacker = ensure_user(JOB_USER), ensure_user(ATTACKER)
    env = {"VMLOADER_CACHE_DIR": str(config.load().cache_dir)}
    state = Path(user.pw_dir) / ".local/share/vmloader"
    secret, job_id = "user-" + secrets.token_hex(8), "files-user-" + secrets.token_hex(3)
    proc = as_user(user, readable_checkout, ["run", "--image", "debian-12", "--json", "--snapshot", "always",
                                             "--job-id", job_id, "--", *job_command(secret)], env)
    job_dir = state / "jobs" / job_id
    try:
        wait_for_ready(job_dir, proc)
        overlay = overlay_from_ps(attacker, job_domain(job_dir), user.pw_name)     # its session daemon's QEMU
        assert overlay == job_dir / "overlay.qcow2"
        running = attacker_tries(attacker, running_paths(job_dir))
        assert secret_on_disk(overlay, secret.encode())
    finally:
        os.kill(_vmloader_pid(proc), signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    assert json.loads(out)["snapshot"] == job_id, err
    assert set(running.values()) == {"Permission denied"}, running
    snapshot = state / "snapshots" / job_id
    finished = attacker_tries(attacker, finished_paths(job_dir, snapshot))
    assert set(finished.values()) == {"Permission denied"}, finished
    assert modes(state, job_id) == {("dir", 0o700, user.pw_gid), ("file", 0o600, None)}, modes(state, job_id)
    again = as_user(user, readable_checkout, ["snapshot", "exec", job_id, "--", "cat", "/work/marker"], env)
    out, err = again.communicate(timeout=900)
    assert again.returncode == 0 and out.strip() == secret, err
    rm = as_user(user, readable_checkout, ["snapshot", "rm", job_id], env)
    assert rm.communicate(timeout=60) and rm.returncode == 0
    record_row("another local user reads a running job's files (path from `ps`): an unprivileged user's job",
               "EACCES", "refused: overlay, console log, domain XML, owner and phase files, captured stdout, "
               "agent sockets, job dir and state dir listings", "", f"{overlay}: {running[str(overlay)]}",
               "the job ran on and its state was kept; the owner boots it again")
    record_row("another local user reads a finished job's record and snapshot: an unprivileged user's job",
               "EACCES", "refused: metadata, output tails, console log, snapshot disk and metadata, listings", "",
               f"{snapshot / 'disk.qcow2'}: {finished[str(snapshot / 'disk.qcow2')]}", "dirs 0700, files 0600")


def test_a_state_dir_of_another_user_is_refused_before_anything_is_made(vmloader, state_dir):
    attacker = ensure_user(ATTACKER)
    state_dir.mkdir()
    os.chown(state_dir, attacker.pw_uid, attacker.pw_gid)
    run = vmloader("run", "--image", "debian-12", "--", "true")
    assert run.returncode == 125, run.err
    assert "is not a directory of your own" in run.err and "state_dir" in run.err
    assert list(state_dir.iterdir()) == []


def test_a_guest_writing_htcondors_sandbox_files_as_outputs_changes_nothing(vmloader, tmp_path, no_leftovers):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    host_files = {".chirp.config": "chirp for the starter\n", "_condor_stdout": "the job's real stdout\n",
                  ".job.ad": "ClusterId = 1\n"}
    for name, text in host_files.items():
        (sandbox / name).write_text(text)
    script = "; ".join(f"echo forged > /work/{name}" for name in host_files) + "; echo made > /work/result.txt"
    run = vmloader("run", "--image", "debian-12", "--json", "--output-new", "--output-dir", str(sandbox),
                   "--", "sh", "-c", script)
    result = run.json()
    assert run.returncode == 0, run.err
    assert {n: (sandbox / n).read_text() for n in host_files} == host_files
    assert (sandbox / "result.txt").read_text() == "made\n"
    refused = {e["output"]: e["message"] for e in result["output_errors"]}
    assert sorted(refused) == sorted(host_files), result["output_errors"]
    assert all("HTCondor reserves this name" in m for m in refused.values())
    assert sorted(p.name for p in sandbox.iterdir()) == sorted([*host_files, "result.txt"])
    record_row("a guest writes .chirp.config, .job.ad and _condor_stdout as new outputs (--output-new)",
               result["exit_status"], "succeeded (command's status); the names refused", "collect",
               refused[".chirp.config"], "the host's files unchanged; result.txt collected; the refusals in "
                                         "output_errors")

"""Post-mortem sessions through real boots: a timed-out job frozen with its memory and
resumed by `snapshot boot`; shells on a real terminal; ports and ssh into a booted
snapshot. The snapshot's files are byte-identical afterwards every time."""
import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from pathlib import Path

import pytest

from vmloader.bootstrapper.cache import sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]

CLI = [sys.executable, "-m", "vmloader.bootstrapper.cli"]


def snapshot_files(state_dir: Path, snap_id: str) -> dict:
    folder = state_dir / "snapshots" / snap_id
    return {name: sha256_file(folder / name) for name in ("disk.qcow2", "memory.save") if (folder / name).exists()}


class Terminal:
    """A real pseudo-terminal around a vmloader command, driven like a user at a keyboard."""

    def __init__(self, argv, env, cwd, rows=33, cols=111):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, *argv[1:]], env)
        self.resize(rows, cols)
        self.seen = b""

    def resize(self, rows, cols):
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, keys: bytes):
        os.write(self.fd, keys)

    def expect(self, text: bytes, timeout=120) -> bytes:
        """Everything up to and including `text` (then forgotten)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"never saw {text!r}; the terminal shows {self.seen[-1500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:
                    raise AssertionError(f"the terminal closed before {text!r}: {self.seen[-1500:]!r}")
        head, _, self.seen = self.seen.partition(text)
        return head + text

    def wait(self, timeout=120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.read(self.fd, 4096)          # keep draining so the child never blocks on output
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the command did not end")


@pytest.fixture
def terminal(vm_env, tmp_path):
    """Start a command on a Terminal; a test that fails half-way still ends it (and its VM)."""
    started = []

    def open_terminal(*args):
        term = Terminal([*CLI, *args], vm_env, tmp_path)
        started.append(term)
        return term
    yield open_terminal
    for term in started:
        try:
            os.kill(term.pid, signal.SIGTERM)
            term.wait()
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture
def booted(vm_env, tmp_path):
    """Start `vmloader snapshot boot ID --json ...`; yields its announcement; stops it with Ctrl-C."""
    procs = []

    def boot(snap_id, *extra):
        proc = subprocess.Popen([*CLI, "snapshot", "boot", snap_id, "--json", *extra], env=vm_env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline()
        assert line, f"snapshot boot ended early: {proc.stderr.read()}"
        return json.loads(line)
    yield boot
    for proc in procs:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()


def test_a_timed_out_job_is_frozen_with_its_memory_and_boot_resumes_the_hung_process(
        vmloader, state_dir, booted, tmp_path):
    run = vmloader("run", "--image", "debian-12", "--timeout", "20", "--env", "MARKER=frozen-at-3am", "--json",
                   "--", "sh", "-c", "echo started; exec sleep 1000")
    result = run.json()
    assert result["exit_status"] == 124 and result["outcome"] == "timeout", run.err
    snap = result["snapshot"]
    show = vmloader("snapshot", "show", snap, "--json").json()
    assert show["memory"] is True
    before = snapshot_files(state_dir, snap)
    assert set(before) == {"disk.qcow2", "memory.save"}

    up = booted(snap, "--forward", "0:8000")
    assert up["resumed_from_memory"] is True
    ps = vmloader("snapshot", "exec", snap, "--", "sh", "-c",
                  'pgrep -ax sleep; tr "\\0" "\\n" < /proc/$(pgrep -x sleep)/environ | grep MARKER')
    assert ps.returncode == 0, ps.err
    assert "sleep 1000" in ps.out and "MARKER=frozen-at-3am" in ps.out     # the very process, not a rerun

    # A port of the booted guest, forwarded over the agent channel (no guest network needed).
    serve = vmloader("snapshot", "exec", snap, "--", "sh", "-c",
                     "cd /etc && (python3 -m http.server --bind 127.0.0.1 8000 >/dev/null 2>&1 &); "
                     "for i in $(seq 120); do ss -ltn | grep -q 127.0.0.1:8000 && exit 0; sleep 0.5; done; exit 1")
    assert serve.returncode == 0, serve.err
    port = up["forwards"][0]["host_port"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/hostname", timeout=120).read().decode()
    assert body.startswith("vm-")
    assert snapshot_files(state_dir, snap) == before


def test_snapshot_shell_gives_a_real_terminal_in_the_jobs_dir_and_environment(vmloader, state_dir, terminal):
    job = vmloader("run", "--image", "debian-12", "--env", "STAGE=nightly", "--json", "--", "sh", "-c",
                   "echo from-the-job > kept.txt; exit 5").json()
    snap = job["snapshot"]
    before = snapshot_files(state_dir, snap)
    term = terminal("snapshot", "shell", snap)
    term.expect(b"/work$ ", timeout=300)
    term.send(b"cat kept.txt; echo stage=$STAGE; echo size=$(stty size)\r")
    screen = term.expect(b"size=33 111")
    assert b"from-the-job\r\n" in screen and b"stage=nightly\r\n" in screen, screen
    term.resize(44, 122)
    os.kill(term.pid, signal.SIGWINCH)            # what the terminal emulator does on a resize
    term.send(b"echo size=$(stty size)\r")
    term.expect(b"size=44 122", timeout=30)
    term.send(b"echo abX\x7fc\r")                  # backspace is line editing done by the guest
    term.expect(b"abc\r\n", timeout=30)
    term.send(b"sleep 300; echo not-$((1+1))-interrupted\r")
    time.sleep(3)
    term.send(b"\x03")                            # Ctrl-C reaches the guest's foreground process
    term.send(b"echo after-$((2+2))\r")
    screen = term.expect(b"after-4\r\n", timeout=30)
    assert b"not-2-interrupted" not in screen
    term.send(b"exit 7\r")
    assert term.wait() == 7
    assert snapshot_files(state_dir, snap) == before


def test_a_root_shell_attaches_to_a_booted_snapshot(vmloader, booted, terminal):
    snap = vmloader("run", "--image", "debian-12", "--json", "--", "sh", "-c", "exit 1").json()["snapshot"]
    bad = vmloader("snapshot", "boot", snap, "--forward", "80")
    assert bad.returncode == 125 and "expected HOST_PORT:GUEST_PORT" in bad.err, bad.err
    up = booted(snap)
    twice = vmloader("snapshot", "boot", snap)
    assert twice.returncode == 125 and "already booted" in twice.err and "snapshot shell" in twice.err
    term = terminal("snapshot", "shell", snap, "--root")
    started = time.monotonic()
    term.expect(b"# ", timeout=60)
    assert time.monotonic() - started < 30       # attached: no second boot
    term.send(b"echo uid=$(id -u) init=$(tr '\\0' ' ' < /proc/1/cmdline)\r")
    screen = term.expect(b"--pid1")
    assert b"uid=0 init=python3 -m vmloader.agent" in screen, screen
    term.send(b"exit\r")
    assert term.wait() == 0
    assert up["pid"] > 0


def test_boot_with_ssh_authorizes_the_users_key(vmloader, state_dir, booted, tmp_path):
    if not Path("/usr/bin/ssh").exists():
        pytest.skip("no ssh client on this host")
    snap = vmloader("run", "--image", "debian-12", "--json", "--", "sh", "-c",
                    "echo via-ssh > /work/note; exit 2").json()["snapshot"]
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    up = booted(snap, "--ssh", "--ssh-key", f"{key}.pub")
    port = up["forwards"][-1]["host_port"]
    assert up["ssh"].startswith(f"ssh -p {port} ")
    ssh = subprocess.run(["ssh", "-p", str(port), "-i", str(key), "-o", "StrictHostKeyChecking=no",
                          "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=60",
                          "vmloader@127.0.0.1", "cat /work/note; id -un"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=180)
    assert ssh.returncode == 0, ssh.stderr
    assert ssh.stdout.split() == ["via-ssh", "vmloader"]


def test_boot_refuses_bad_forwards_and_unknown_ids_clearly(vmloader):
    bad = vmloader("snapshot", "boot", "no-such-snapshot")
    assert bad.returncode == 125 and "no snapshot with id 'no-such-snapshot'" in bad.err
    shell = vmloader("snapshot", "shell", "no-such-snapshot")
    assert shell.returncode == 125 and "vmloader snapshot list" in shell.err

"""Post-mortem sessions through real boots: a timed-out job frozen with its memory and
resumed by `snapshot boot`; shells on a real terminal; ports and ssh into a booted
snapshot. The snapshot's files are byte-identical afterwards every time."""
import json
import os
import shutil
import signal
import subprocess
import socket
import tempfile
import time
from pathlib import Path

import pytest

from vmloader.bootstrapper import config
from vmloader.bootstrapper.cache import sha256_file

from .conftest import as_user, ensure_user, next_line
from .faulttable import record_row

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]


def http_get(socket_path: str, path: str) -> bytes:
    """An HTTP/1.0 GET through a forward's Unix socket (what `curl --unix-socket` does)."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(120)
        conn.connect(socket_path)
        conn.sendall(f"GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n".encode())
        reply = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return reply
            reply += data


SERVE_ETC = ("cd /etc && (python3 -m http.server --bind 127.0.0.1 8000 >/dev/null 2>&1 &); "
             "for i in $(seq 120); do ss -ltn | grep -q 127.0.0.1:8000 && exit 0; sleep 0.5; done; exit 1")


def snapshot_files(state_dir: Path, snap_id: str) -> dict:
    folder = state_dir / "snapshots" / snap_id
    return {name: sha256_file(folder / name) for name in ("disk.qcow2", "memory.save") if (folder / name).exists()}


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

    up = booted(snap, "--forward", "8000")
    assert up["resumed_from_memory"] is True
    ps = vmloader("snapshot", "exec", snap, "--", "sh", "-c",
                  'pgrep -ax sleep; tr "\\0" "\\n" < /proc/$(pgrep -x sleep)/environ | grep MARKER')
    assert ps.returncode == 0, ps.err
    assert "sleep 1000" in ps.out and "MARKER=frozen-at-3am" in ps.out     # the very process, not a rerun

    # A port of the booted guest, forwarded over the agent channel (no guest network needed)
    # to a Unix socket in the snapshot's private ports/ directory.
    serve = vmloader("snapshot", "exec", snap, "--", "sh", "-c", SERVE_ETC)
    assert serve.returncode == 0, serve.err
    sock = up["forwards"][0]["socket"]
    assert up["forwards"] == [{"guest_port": 8000, "socket": sock}]
    assert Path(sock) == state_dir / "snapshots" / snap / "ports" / "guest-8000.sock"
    assert oct(Path(sock).parent.stat().st_mode & 0o777) == "0o700"
    reply = http_get(sock, "/hostname")
    assert reply.startswith(b"HTTP/1.0 200") and reply.split(b"\r\n\r\n", 1)[1].startswith(b"vm-"), reply
    via = vmloader("snapshot", "connect", snap, "8000", input=b"GET /hostname HTTP/1.0\r\n\r\n")
    assert via.returncode == 0 and b"\r\n\r\nvm-" in via.stdout, via.err
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
    term.send(b"echo sleep-$((3+3)); sleep 300; echo not-$((1+1))-interrupted\r")
    term.expect(b"sleep-6\r\n", timeout=30)         # the sleep runs (give it a moment to start)
    time.sleep(1)
    term.send(b"\x03")                            # Ctrl-C reaches the guest's foreground process
    term.send(b"echo after-$((2+2))\r")
    screen = term.expect(b"after-4\r\n", timeout=30)
    assert b"not-2-interrupted" not in screen
    term.send(b"exit 7\r")
    assert term.wait() == 7
    assert snapshot_files(state_dir, snap) == before


def test_a_root_shell_attaches_to_a_booted_snapshot(vmloader, booted, terminal):
    snap = vmloader("run", "--image", "debian-12", "--json", "--", "sh", "-c", "exit 1").json()["snapshot"]
    bad = vmloader("snapshot", "boot", snap, "--forward", "80:0")
    assert bad.returncode == 125 and "expected GUEST_PORT" in bad.err, bad.err
    up = booted(snap)
    twice = vmloader("snapshot", "boot", snap)
    assert twice.returncode == 125 and "already booted" in twice.err and "snapshot shell" in twice.err
    term = terminal("snapshot", "shell", snap, "--root")
    term.expect(b"# ", timeout=300)
    term.send(b"echo uid=$(id -u) on=$(hostname) init=$(tr '\\0' ' ' < /proc/1/cmdline)\r")
    screen = term.expect(b"--pid1")
    # PID 1 is the agent, as vmloader-init starts it
    assert (b"uid=0 on=vm-" + up["job_id"][-6:].encode()
            + b" init=python3 -c from vmloader.agent.__main__ import main; main() --pid1") in screen, screen
    term.send(b"exit\r")
    assert term.wait() == 0
    assert up["pid"] > 0


def test_boot_with_ssh_pins_the_guests_host_key_and_goes_through_a_private_socket(vmloader, state_dir, booted,
                                                                                  tmp_path):
    if not Path("/usr/bin/ssh").exists():
        pytest.skip("no ssh client on this host")
    snap = vmloader("run", "--image", "debian-12", "--json", "--", "sh", "-c",
                    "echo via-ssh > /work/note; exit 2").json()["snapshot"]
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    up = booted(snap, "--ssh", "--ssh-key", f"{key}.pub")
    ssh = up["ssh"]
    ports = state_dir / "snapshots" / snap / "ports"
    assert ssh["socket"] == str(ports / "guest-22.sock") and ssh["known_hosts"] == str(ports / "known_hosts")
    assert up["forwards"] == [{"guest_port": 22, "socket": ssh["socket"]}]
    assert "StrictHostKeyChecking=yes" in ssh["argv"] and "-i" in ssh["argv"]
    # The pinned key is the one the guest's sshd serves: read it independently, from inside.
    pub = vmloader("snapshot", "exec", "--root", snap, "--", "cat", "/etc/ssh/ssh_host_ed25519_key.pub")
    alias, kind, blob = Path(ssh["known_hosts"]).read_text().split()
    assert (alias, kind) == (ssh["host_key_alias"], "ssh-ed25519") and pub.out.split()[1] == blob

    def run_ssh(argv):
        return subprocess.run([argv[0], "-o", "BatchMode=yes", "-o", "ConnectTimeout=60", *argv[1:],
                               "cat /work/note; id -un"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=180)
    good = run_ssh(ssh["argv"])
    assert good.returncode == 0, good.stderr
    assert "vmloader:" not in good.stderr           # the ProxyCommand ends quietly (ssh sends it SIGHUP)
    assert good.stdout.split() == ["via-ssh", "vmloader"]
    # The same command with a known_hosts file holding another key for the alias is refused.
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"{alias} {(tmp_path / 'other.pub').read_text().split()[0]} "
                     f"{(tmp_path / 'other.pub').read_text().split()[1]}\n")
    swapped = [f"UserKnownHostsFile={wrong}" if a.startswith("UserKnownHostsFile=") else a for a in ssh["argv"]]
    bad = run_ssh(swapped)
    assert bad.returncode == 255 and "Host key verification failed" in bad.stderr, bad.stderr
    assert "via-ssh" not in bad.stdout


def test_boot_refuses_bad_forwards_and_unknown_ids_clearly(vmloader):
    bad = vmloader("snapshot", "boot", "no-such-snapshot")
    assert bad.returncode == 125 and "no snapshot with id 'no-such-snapshot'" in bad.err
    shell = vmloader("snapshot", "shell", "no-such-snapshot")
    assert shell.returncode == 125 and "vmloader snapshot list" in shell.err


PROBE = """
import errno, os, socket, sys
path = sys.argv[1]
conn = socket.socket(socket.AF_UNIX)
try:
    conn.connect(path)
    print("connected")
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""


def connect_as(user, path: str) -> str:
    """What a plain connect() to `path` gives `user`: connected, or the errno's name."""
    probe = subprocess.run(["runuser", "-u", user.pw_name, "--", "/usr/bin/python3", "-c", PROBE, path],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    return probe.stdout.strip()


def finished(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture
def owners_state(built_image):
    """A state dir of the test's booting user, traversable by all (0711) like /var/lib: the snapshot
    store (0700) and the snapshot's private ports/ directory keep other users away from its sockets."""
    owner = ensure_user("vmlt-ports-a")
    state = Path(tempfile.mkdtemp(prefix="vmloader-ports-", dir="/var/tmp"))
    os.chmod(state, 0o711)
    os.chown(state, owner.pw_uid, owner.pw_gid)
    yield owner, {"VMLOADER_CACHE_DIR": str(config.load().cache_dir), "VMLOADER_STATE_DIR": str(state / "state")}
    shutil.rmtree(state, ignore_errors=True)


def test_another_local_user_cannot_connect_to_a_forward_of_a_booted_snapshot(vmloader, booted, readable_checkout,
                                                                            owners_state):
    other = ensure_user("vmlt-ports-b")
    # A snapshot booted by root.
    snap = vmloader("run", "--image", "debian-12", "--json", "--", "sh", "-c", "exit 1").json()["snapshot"]
    sock = booted(snap, "--forward", "8000")["forwards"][0]["socket"]
    assert connect_as(other, sock) == "EACCES"
    peek = as_user(other, readable_checkout, ["snapshot", "connect", "--socket", sock], {}, stdin=subprocess.DEVNULL)
    code, _, err = finished(peek, 120)
    assert code == 125 and "permission denied" in err and "only by the user who booted the snapshot" in err, err

    # A snapshot a user booted as themselves (qemu:///session): they reach their port, the other user does not.
    owner, env = owners_state
    code, out, err = finished(as_user(owner, readable_checkout, ["run", "--image", "debian-12", "--json",
                                                                 "--snapshot", "always", "--", "true"], env))
    assert code == 0, err
    theirs = json.loads(out)["snapshot"]
    boot = as_user(owner, readable_checkout, ["snapshot", "boot", theirs, "--json", "--forward", "8000"], env,
                   stdin=subprocess.DEVNULL)
    line = next_line(boot)
    assert line, boot.stderr.read()
    up = json.loads(line)
    try:
        code, _, err = finished(as_user(owner, readable_checkout, ["snapshot", "exec", theirs, "--", "sh", "-c",
                                                                   SERVE_ETC], env))
        assert code == 0, err
        mine = as_user(owner, readable_checkout, ["snapshot", "connect", theirs, "8000"], env,
                       stdin=subprocess.PIPE)
        out, err = mine.communicate("GET /hostname HTTP/1.0\r\n\r\n", timeout=120)
        assert mine.returncode == 0 and out.startswith("HTTP/1.0 200") and "\nvm-" in out, (out, err)
        their_sock = up["forwards"][0]["socket"]
        assert connect_as(owner, their_sock) == "connected"
        assert connect_as(other, their_sock) == "EACCES"
    finally:
        os.kill(up["pid"], signal.SIGINT)
        assert boot.wait(timeout=180) == 0, boot.stderr.read()
    record_row(**{"fault": "another local user connects to a forwarded port of a booted snapshot", "exit": 125,
                   "outcome": "refused (EACCES)", "phase": None,
                   "message": "<snapshot>/ports/guest-8000.sock: permission denied",
                   "kept": "the owner's own connections (ports/ is 0700, the socket 0600)"})

"""Interactive ways into a kept job state: a shell on a pty, a long-running boot that
others attach to (shell, exec, forwarded ports, ssh).

A session runs where a job's command would (see `job.Session`): the VM is booted
on a throwaway overlay by JobRunner and torn down after; the snapshot is only read.
`snapshot boot` also writes `booted.json` into the snapshot's directory so later
`snapshot shell`/`exec` calls attach to the running VM through a free agent port,
and keeps its forwarded ports (Unix sockets) and the guest's pinned ssh host key in
the snapshot's `ports/` directory, private to the user who booted it.
"""
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, List, Optional

from . import guestssh
from .agentclient import AgentClient, ByteSink, ExecResult, PtySpec
from .errors import Interrupted, SnapshotError, UsageError
from .forward import Forward, Forwarder, start_all
from .job import GUEST_USER, GUEST_WORKDIR, Attached
from .orphans import pid_alive
from .privatedir import PrivateDir
from .snapshots import Snapshot
from .terminal import following_window_size, raw_mode, window_size

SSH_KEYS = ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub")


def shell_session(stdin: Optional[BinaryIO], argv: Optional[list] = None):
    """The user's login shell (or `argv`) in the guest on a pty sized like this terminal."""
    fd = _fileno(stdin)

    def run(attached, out: ByteSink, err: ByteSink) -> ExecResult:
        rows, cols = window_size(fd if fd is not None else 1)
        started: List[int] = []
        with raw_mode(fd), following_window_size(
                fd if fd is not None else 1,
                lambda r, c: started and attached.client.resize(started[0], r, c)):
            return attached.client.exec(argv, env=attached.env, user=attached.user, cwd=attached.cwd,
                                        stdin=stdin, stdout=out, stderr=err,
                                        pty=PtySpec(rows, cols, os.environ.get("TERM") or "xterm"),
                                        on_start=started.append)
    return run


def command_session(argv: list, stdin: Optional[BinaryIO], timeout: Optional[float]):
    def run(attached, out: ByteSink, err: ByteSink) -> ExecResult:
        return attached.client.exec(argv, env=attached.env, user=attached.user, cwd=attached.cwd,
                                    stdin=stdin, stdout=out, stderr=err,
                                    deadline=time.monotonic() + timeout if timeout else None)
    return run


@dataclass(frozen=True)
class BootOptions:
    forwards: tuple = ()             # Forward
    ssh_key: Optional[Path] = None   # a public key: start sshd in the guest and forward a port to it
    as_json: bool = False


PORTS_DIR = "ports"                 # in the snapshot's directory: 0700, the forwards' sockets and known_hosts
KNOWN_HOSTS = "known_hosts"


def default_ssh_key() -> Path:
    home = Path.home() / ".ssh"
    for name in SSH_KEYS:
        if (home / name).is_file():
            return home / name
    raise UsageError(f"--ssh: no public key in {home} ({', '.join(SSH_KEYS)})",
                     hint="create one with `ssh-keygen -t ed25519`, or name it with --ssh-key FILE.pub")


def hold_session(snapshot: Snapshot, options: BootOptions, jobs_dir: Path):
    """Keep the VM running until Ctrl-C/SIGTERM, with forwarded ports; say how to reach it."""
    def run(attached, out: ByteSink, err: ByteSink) -> ExecResult:
        ports = PrivateDir(snapshot.path / PORTS_DIR)
        forwarders: List[Forwarder] = []
        try:
            ssh = _ssh_setup(attached, snapshot, options.ssh_key, ports) if options.ssh_key is not None else None
            forwards = list(options.forwards) + ([Forward(22)] if ssh else [])
            forwarders = start_all(attached.client, forwards, ports)
            info = _boot_info(snapshot, attached, jobs_dir, ports, forwarders, ssh)
            _write_private_json(snapshot.booted_file, info)
            _announce(info, options.as_json)
            while True:
                attached.client.check_alive()
                time.sleep(0.5)
        except Interrupted:
            return ExecResult(0, None, None)
        finally:
            snapshot.booted_file.unlink(missing_ok=True)
            for forwarder in forwarders:
                forwarder.close()
            ports.unlink(KNOWN_HOSTS)
            ports.close(remove=True)
    return run


def _ssh_setup(attached, snapshot: Snapshot, ssh_key: Path, ports: PrivateDir) -> dict:
    """Start the guest's sshd for `ssh_key`, pin its host key in a known_hosts file; how to ssh in."""
    user = guestssh.start_sshd(attached, ssh_key)
    alias = f"vmloader-snapshot-{snapshot.meta.id}"
    known_hosts = ports.write(KNOWN_HOSTS, guestssh.known_hosts_line(alias, guestssh.fetch_host_key(attached)))
    argv = guestssh.ssh_argv(ports.path / Forward(22).socket_name, known_hosts, alias, user,
                             guestssh.identity_for(ssh_key))
    return {"argv": argv, "command": shlex.join(argv), "known_hosts": str(known_hosts),
            "host_key_alias": alias, "user": user, "socket": str(ports.path / Forward(22).socket_name)}


def _boot_info(snapshot: Snapshot, attached, jobs_dir: Path, ports: PrivateDir, forwarders: list,
               ssh: Optional[dict]) -> dict:
    info = {"snapshot": snapshot.meta.id, "pid": os.getpid(), "job_id": attached.job_id,
            "resumed_from_memory": snapshot.meta.memory, "sockets": list(attached.sockets),
            "user": attached.user, "env": attached.env,
            "console_log": str(Path(jobs_dir) / attached.job_id / "console.log"),
            "ports_dir": str(ports.path),
            "forwards": [{"guest_port": f.forward.guest_port, "socket": str(f.path)} for f in forwarders]}
    if ssh:
        info["ssh"] = ssh
    return info


def _announce(info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info), flush=True)
        return
    how = "resumed from its memory state" if info["resumed_from_memory"] else "booted from its disk state"
    snap = info["snapshot"]
    lines = [f"vmloader: snapshot {snap} is running ({how}) on a throwaway overlay; "
             "the snapshot itself stays unchanged.",
             f"  shell:    vmloader snapshot shell {snap} [--root]",
             f"  command:  vmloader snapshot exec {snap} -- CMD"]
    for f in info["forwards"]:
        lines += [f"  forward:  guest port {f['guest_port']} at {f['socket']} (only you can connect)",
                  f"            e.g. curl --unix-socket {shlex.quote(f['socket'])} http://guest/  or  "
                  f"vmloader snapshot connect {snap} {f['guest_port']}  (stdin/stdout)"]
    if info.get("ssh"):
        lines.append(f"  ssh:      {info['ssh']['command']}")
    lines += [f"  console:  {info['console_log']}",
              f"Stop it with Ctrl-C (or kill {info['pid']}); the overlay is thrown away."]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _write_private_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, path)


# -- attaching to a booted snapshot -------------------------------------------
def booted(snapshot: Snapshot) -> Optional[dict]:
    """What `snapshot boot` wrote, if that boot is still running."""
    try:
        info = json.loads(snapshot.booted_file.read_text())
    except (OSError, ValueError):
        return None
    return info if pid_alive(int(info.get("pid") or 0)) else None


@contextmanager
def attach(snapshot: Snapshot, info: dict, root: bool):
    """A connected agent client on a free attach port of a booted snapshot's VM."""
    what = f"snapshot {snapshot.meta.id} is booted (pid {info['pid']})"
    with attach_sockets(info.get("sockets") or (), dict(info.get("env") or {}), "root" if root else GUEST_USER,
                        GUEST_WORKDIR, info.get("job_id", ""), what, SnapshotError,
                        dead_hint="stop that boot and try again",
                        busy_hint="close one of the other shells, or stop the boot and try again") as attached:
        yield attached


@contextmanager
def attach_sockets(sockets, env: dict, user: str, cwd: str, job_id: str, what: str, error=SnapshotError, *,
                   dead_hint: str, busy_hint: str):
    """The job's identity in the guest (env, user, cwd) with a client connected on the first free
    one of a running VM's attach ports (taken by holding `<socket>.lock`); `error(message, hint)`
    when that port does not answer or all are taken."""
    for path in sockets:
        lock = open(os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600), "r+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            lock.close()
            raise error(f"{what} but its agent socket {path} does not answer: {exc.strerror}",
                        hint=dead_hint) from None
        client = AgentClient(sock)
        try:
            client.handshake(timeout=15)
            yield Attached(client, dict(env), user, cwd, job_id)
            return
        finally:
            client.close()
            lock.close()
    raise error(f"{what} and all its {len(sockets)} attach ports are in use", hint=busy_hint)


def _fileno(stream: Optional[BinaryIO]) -> Optional[int]:
    try:
        return stream.fileno() if stream is not None else None
    except (OSError, ValueError, AttributeError):
        return None

"""ssh into a booted snapshot: the user's key authorized in the guest, the guest's sshd
started on its loopback, and its host key pinned.

The client reaches sshd through the forward's private Unix socket (ssh's ProxyCommand
runs `vmloader snapshot connect`), and checks the host key strictly against a
known_hosts file written in that private directory. The key is read from the guest
over the agent channel after sshd made it; the guest is untrusted, so what it
returns is parsed strictly and only the 32 bytes of the ed25519 key are kept.
"""
import base64
import binascii
import os
import re
import shlex
import struct
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import guesttext
from .errors import AgentError, UsageError

HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
KEY_TYPE = b"ssh-ed25519"
_KEY_LINE = re.compile(rb"ssh-ed25519 ([A-Za-z0-9+/]{68})(?: [\x21-\x7e][\x20-\x7e]{0,255})?\n?")
MAX_OUTPUT = 4096           # bytes kept of a guest command's output


class _Capped:
    """A sink that keeps the first MAX_OUTPUT bytes written to it."""

    def __init__(self):
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.data += data[:MAX_OUTPUT - len(self.data)]
        return len(data)

    def flush(self) -> None:
        pass


def _guest_sh(attached, script: str, what: str, hint: str) -> bytes:
    out, err = _Capped(), _Capped()
    result = attached.client.exec(["sh", "-c", script], env={}, user="root", cwd="/", stdin=None,
                                  stdout=out, stderr=err, deadline=time.monotonic() + 60)
    if result.exit_code != 0:
        said = guesttext.cap(guesttext.escape(bytes(err.data or out.data).strip()), 400)
        raise AgentError(f"--ssh: {what}: {said} (exit {result.exit_code})", hint=hint)
    return bytes(out.data)


def start_sshd(attached, key: Path) -> str:
    """Authorize `key` for the session's guest user and start the guest's sshd on loopback,
    serving only its ed25519 host key (made now if the image has none)."""
    if not key.is_file():
        raise UsageError(f"--ssh-key {key}: no such file", hint="give a public key file (*.pub)")
    user = attached.user
    home = "/root" if user == "root" else f"/home/{user}"
    attached.client.put_file(str(key), f"{home}/.ssh/authorized_keys", mode=0o600, user=user)
    script = ("test -x /usr/sbin/sshd || { echo 'this image has no sshd (package openssh-server)' >&2; exit 3; }; "
              "mkdir -p /run/sshd && chmod 0755 /run/sshd; "
              f"test -s {HOST_KEY} || {{ rm -f {HOST_KEY} {HOST_KEY}.pub; "
              f"ssh-keygen -q -t ed25519 -N '' -f {HOST_KEY} </dev/null; }}; "
              f"chown {user} {home}/.ssh 2>/dev/null; chmod 0700 {home}/.ssh; "
              f"/usr/sbin/sshd -o ListenAddress=127.0.0.1 -o HostKey={HOST_KEY} </dev/null >/dev/null "
              "2>/run/sshd.err || { cat /run/sshd.err >&2; exit 4; }")
    _guest_sh(attached, script, "could not start sshd in the guest",
              "use `vmloader snapshot shell ID` instead, or add openssh-server to the image")
    return user


def fetch_host_key(attached) -> bytes:
    """The public half of the key the guest's sshd serves (derived from its private key)."""
    out = _guest_sh(attached, f"ssh-keygen -y -f {HOST_KEY}", "could not read the guest's ssh host key",
                    "use `vmloader snapshot shell ID` instead")
    return parse_host_key(out)


def parse_host_key(text: bytes) -> bytes:
    """The key blob of one `ssh-ed25519 BASE64 [comment]` line; anything else is refused."""
    match = _KEY_LINE.fullmatch(text)
    if not match:
        raise AgentError(f"--ssh: the guest's host key is not one ssh-ed25519 line: "
                         f"{guesttext.cap(guesttext.escape(text), 200)}",
                         hint="the guest changed its sshd setup; use `vmloader snapshot shell ID` instead")
    try:
        blob = base64.b64decode(match.group(1), validate=True)
    except binascii.Error:
        blob = b""
    expected = struct.pack(">I", len(KEY_TYPE)) + KEY_TYPE + struct.pack(">I", 32)
    if len(blob) != len(expected) + 32 or not blob.startswith(expected):
        raise AgentError("--ssh: the guest's host key does not decode to an ed25519 key",
                         hint="the guest changed its sshd setup; use `vmloader snapshot shell ID` instead")
    return blob


def known_hosts_line(alias: str, blob: bytes) -> bytes:
    return f"{alias} {KEY_TYPE.decode()} {base64.b64encode(blob).decode()}\n".encode()


def vmloader_argv() -> List[str]:
    """How to run this vmloader again from ssh's ProxyCommand."""
    if Path(sys.argv[0]).name == "vmloader" and os.access(sys.argv[0], os.X_OK):
        return [os.path.abspath(sys.argv[0])]
    return [sys.executable, "-m", "vmloader.bootstrapper.cli"]


def ssh_argv(socket_path: Path, known_hosts: Path, alias: str, user: str,
             identity: Optional[Path] = None) -> List[str]:
    """ssh through the forward's socket, checking the host key against `known_hosts` only."""
    proxy = shlex.join([*vmloader_argv(), "snapshot", "connect", "--socket", str(socket_path)])
    argv = ["ssh"]
    if identity is not None:
        argv += ["-i", str(identity)]
    return argv + ["-o", f"ProxyCommand={proxy.replace('%', '%%')}",
                   "-o", f"UserKnownHostsFile={_ssh_path(known_hosts)}", "-o", "GlobalKnownHostsFile=/dev/null",
                   "-o", "StrictHostKeyChecking=yes", "-o", f"HostKeyAlias={alias}",
                   "-o", "HostKeyAlgorithms=ssh-ed25519", f"{user}@{alias}"]


def _ssh_path(path: Path) -> str:
    """ssh expands % and ~ tokens in file options, and splits them at spaces."""
    text = str(path).replace("%", "%%")
    return f'"{text}"' if " " in text else text


def identity_for(public_key: Path) -> Optional[Path]:
    """The private key beside a `*.pub` file, when it is there."""
    private = public_key.with_suffix("") if public_key.suffix == ".pub" else None
    return private if private is not None and private.is_file() else None

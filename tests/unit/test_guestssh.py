"""The guest's ssh host key is parsed strictly (the guest is untrusted) and pinned."""
import base64
import shlex
import struct
import subprocess
from pathlib import Path

import pytest

from vmloader.bootstrapper import guestssh
from vmloader.bootstrapper.errors import AgentError

BLOB = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + bytes(range(32))
KEY = base64.b64encode(BLOB)


@pytest.mark.parametrize("line", [b"ssh-ed25519 " + KEY, b"ssh-ed25519 " + KEY + b"\n",
                                  b"ssh-ed25519 " + KEY + b" root@vm-1\n"])
def test_one_ed25519_line_gives_the_key_blob(line):
    assert guestssh.parse_host_key(line) == BLOB


@pytest.mark.parametrize("line", [
    b"", b"ssh-rsa " + KEY, b"ssh-ed25519  " + KEY, b"ssh-ed25519 " + KEY + b"\nssh-ed25519 " + KEY,
    b"ssh-ed25519 " + KEY + b" \x1b[2Jroot", b"ssh-ed25519 " + KEY + b" " + b"c" * 300,
    b"x ssh-ed25519 " + KEY, b"ssh-ed25519 " + KEY[:-4] + b"AAAA" + b"AAAA",
    b"ssh-ed25519 " + base64.b64encode(BLOB.replace(b"ssh-ed25519", b"ssh-ed25518")),
    b"ssh-ed25519 " + base64.b64encode(BLOB[:4] + b"ssh-ed25519" + struct.pack(">I", 31) + bytes(32)),
])
def test_anything_else_from_the_guest_is_refused_and_shown_escaped(line):
    with pytest.raises(AgentError) as error:
        guestssh.parse_host_key(line)
    assert "\x1b" not in error.value.message and len(error.value.message) < 400


def test_the_known_hosts_line_is_rebuilt_from_the_key_alone():
    assert guestssh.known_hosts_line("vmloader-snapshot-x", BLOB) == b"vmloader-snapshot-x ssh-ed25519 " + KEY + b"\n"


def test_ssh_goes_through_the_socket_and_checks_the_pinned_key_strictly(tmp_path):
    argv = guestssh.ssh_argv(Path("/s/my%dir/ports/guest-22.sock"), Path("/s/my dir/ports/known_hosts"),
                             "vmloader-snapshot-x", "vmloader", Path("/home/me/.ssh/id_ed25519"))
    options = dict(argv[i + 1].split("=", 1) for i, word in enumerate(argv) if word == "-o")
    assert argv[:3] == ["ssh", "-i", "/home/me/.ssh/id_ed25519"] and argv[-1] == "vmloader@vmloader-snapshot-x"
    assert options["StrictHostKeyChecking"] == "yes" and options["HostKeyAlias"] == "vmloader-snapshot-x"
    assert options["UserKnownHostsFile"] == '"/s/my dir/ports/known_hosts"'
    assert options["GlobalKnownHostsFile"] == "/dev/null" and options["HostKeyAlgorithms"] == "ssh-ed25519"
    proxy = shlex.split(options["ProxyCommand"].replace("%%", "%"))
    assert proxy[-4:] == ["snapshot", "connect", "--socket", "/s/my%dir/ports/guest-22.sock"]


@pytest.mark.skipif(not Path("/usr/bin/ssh").exists(), reason="no ssh client")
def test_ssh_itself_reads_the_options_as_meant(tmp_path):
    argv = guestssh.ssh_argv(tmp_path / "guest-22.sock", tmp_path / "known hosts", "vmloader-snapshot-x", "u")
    config = subprocess.run([argv[0], "-G", *argv[1:]], stdout=subprocess.PIPE, text=True, check=True).stdout
    seen = dict(line.split(" ", 1) for line in config.splitlines() if " " in line)
    assert seen["stricthostkeychecking"] == "true" and seen["hostkeyalias"] == "vmloader-snapshot-x"
    assert seen["userknownhostsfile"] == f"{tmp_path}/known hosts"
    assert seen["proxycommand"].endswith(f"snapshot connect --socket {tmp_path}/guest-22.sock")


def test_the_private_key_beside_a_public_one_is_used(tmp_path):
    (tmp_path / "id_ed25519.pub").write_text("ssh-ed25519 AAAA me\n")
    assert guestssh.identity_for(tmp_path / "id_ed25519.pub") is None
    (tmp_path / "id_ed25519").write_text("private\n")
    assert guestssh.identity_for(tmp_path / "id_ed25519.pub") == tmp_path / "id_ed25519"

"""Port forwarding over the agent channel: the real agent and client over a socketpair;
forwards are Unix sockets in a directory private to the booting user."""
import os
import pwd
import socket
import stat
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from vmloader.agent.server import Agent
from vmloader.agent.transport import SocketTransport
from vmloader.bootstrapper.agentclient import AgentClient
from vmloader.bootstrapper.errors import UsageError
from vmloader.bootstrapper.forward import (Forward, Forwarder, bridge, open_forward, parse_forward, socket_for,
                                           start_all)
from vmloader.bootstrapper.privatedir import SUN_PATH_MAX, PrivateDir, connect_unix

ME = pwd.getpwuid(os.getuid())


@pytest.mark.parametrize("text, port", [("80", 80), ("8080:80", 80), ("0:22", 22)])
def test_forwards_name_a_guest_port_and_the_old_host_colon_guest_form_maps_to_it(text, port):
    assert parse_forward(text) == Forward(port)
    assert Forward(port).socket_name == f"guest-{port}.sock"


@pytest.mark.parametrize("text", ["0", "a:80", "8080:0", "70000:80", ":80", "8080:", "80000", "-1", ""])
def test_malformed_forwards_say_what_is_expected(text):
    with pytest.raises(UsageError, match="expected GUEST_PORT"):
        parse_forward(text)


@pytest.fixture
def client():
    host, guest = socket.socketpair()
    agent = Agent(SocketTransport(guest), workdir="/tmp", lookup_user=lambda name: ME, poweroff=lambda: None)
    threading.Thread(target=agent.serve, daemon=True).start()
    client = AgentClient(host, heartbeat_timeout=5.0)
    client.handshake(timeout=5)
    yield client
    client.close()


@pytest.fixture
def ports(tmp_path):
    directory = PrivateDir(tmp_path / "ports")
    yield directory
    directory.close()


def guest_service():
    """A 'guest' server that answers each connection with its request reversed."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve():
        while True:
            conn, _ = server.accept()
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    data += conn.recv(4096)
                conn.sendall(data[:-1][::-1] + b"\n")
    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


def test_connections_to_the_socket_reach_the_guest_port_concurrently(client, ports):
    forwarder = Forwarder(client, Forward(guest_service()), ports)
    replies = {}

    def ask(n):
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(10)
            conn.connect(str(forwarder.path))
            conn.sendall(f"request-{n}\n".encode())
            replies[n] = conn.makefile("rb").readline()
    threads = [threading.Thread(target=ask, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    forwarder.close()
    assert replies == {n: f"request-{n}"[::-1].encode() + b"\n" for n in range(5)}
    assert not forwarder.path.exists()            # closing removes the socket


def test_the_guest_closing_its_side_ends_the_connection_while_the_client_still_sends(client, ports):
    forwarder = Forwarder(client, Forward(guest_service()), ports)
    with socket.socket(socket.AF_UNIX) as conn:         # never half-closes: like an HTTP/1.0 client
        conn.settimeout(20)
        conn.connect(str(forwarder.path))
        conn.sendall(b"once\n")
        reply = b""
        while True:
            data = conn.recv(4096)
            if not data:
                break
            reply += data
    assert reply == b"ecno\n"
    forwarder.close()


def test_the_socket_and_its_directory_are_owner_only(client, ports):
    forwarder = Forwarder(client, Forward(80), ports)
    assert forwarder.path == ports.path / "guest-80.sock"
    info = os.lstat(forwarder.path)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(ports.path).st_mode) == 0o700
    assert os.lstat(ports.path).st_uid == os.geteuid()
    forwarder.close()


def test_a_stale_socket_of_a_killed_boot_is_replaced_and_a_port_forwarded_twice_is_one_socket(client, ports):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(ports.path / "guest-7.sock"))
    stale.close()                                  # the file stays, nobody listens
    started = start_all(client, [Forward(7), Forward(7)], ports)
    assert len(started) == 1
    connect_unix(started[0].path).close()
    started[0].close()


def test_a_wider_directory_is_tightened_and_a_symlink_is_never_followed(tmp_path):
    (tmp_path / "wide").mkdir(mode=0o755)
    os.chmod(tmp_path / "wide", 0o777)
    PrivateDir(tmp_path / "wide").close()
    assert stat.S_IMODE(os.lstat(tmp_path / "wide").st_mode) == 0o700
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match="not a directory of ours"):
        PrivateDir(tmp_path / "link")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_directory_of_another_user_is_refused(tmp_path):
    (tmp_path / "theirs").mkdir(mode=0o700)
    os.chown(tmp_path / "theirs", 65534, 65534)
    with pytest.raises(UsageError, match="belongs to uid 65534"):
        PrivateDir(tmp_path / "theirs")


def test_files_in_the_private_dir_are_written_0600_and_replace_a_planted_link(ports, tmp_path):
    target = tmp_path / "target"
    target.write_text("untouched")
    os.symlink(target, ports.path / "known_hosts")
    path = ports.write("known_hosts", b"alias ssh-ed25519 AAAA\n")
    assert path.read_bytes() == b"alias ssh-ed25519 AAAA\n" and not path.is_symlink()
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert target.read_text() == "untouched"


def test_a_socket_path_longer_than_sun_path_is_still_served_and_reached(client, tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.parent.mkdir()
    ports = PrivateDir(deep)
    forwarder = Forwarder(client, Forward(guest_service()), ports)
    assert len(str(forwarder.path)) > SUN_PATH_MAX
    with connect_unix(forwarder.path) as conn:
        conn.sendall(b"long\n")
        assert conn.makefile("rb").readline() == b"gnol\n"
    forwarder.close()
    ports.close(remove=True)
    assert not deep.exists()


class Pipe:
    """stdin/stdout for `bridge` (it reads and writes file descriptors)."""

    def __init__(self, data: bytes = b""):
        self.read_fd, self.write_fd = os.pipe()
        os.write(self.write_fd, data)

    def fileno(self):
        return self.read_fd


def test_the_bridge_carries_stdin_to_the_guest_and_the_reply_to_stdout(client, ports, tmp_path):
    forwarder = Forwarder(client, Forward(guest_service()), ports)
    stdin = Pipe(b"proxied\n")
    os.close(stdin.write_fd)                        # EOF after the request
    with open(tmp_path / "out", "wb") as stdout:
        thread = threading.Thread(target=bridge, args=(open_forward(forwarder.path), stdin, stdout))
        thread.start()
        thread.join(20)
    assert not thread.is_alive()
    assert (tmp_path / "out").read_bytes() == b"deixorp\n"
    forwarder.close()


def test_connecting_to_a_missing_socket_says_the_boot_is_gone(tmp_path):
    with pytest.raises(UsageError, match="no booted snapshot listens there"):
        open_forward(tmp_path / "guest-22.sock")


def as_nobody(path: Path) -> str:
    """What `open_forward(path)` gives a child process running as `nobody`."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            open_forward(path).close()
            os.write(write, b"connected")
        except UsageError as error:
            os.write(write, f"{error.message}|{error.hint}".encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    os.close(write)
    return os.read(read, 4096).decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_another_user_is_refused_at_the_directory(client):
    # Like a snapshot's directory: traversable by all (0711); only its ports/ dir is private.
    base = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        os.chmod(base, 0o711)
        ports = PrivateDir(base / "ports")
        forwarder = Forwarder(client, Forward(80), ports)
        open_socket = socket.socket(socket.AF_UNIX)   # control: the same user reaches a socket beside it
        open_socket.bind(str(base / "open.sock"))
        os.chmod(base / "open.sock", 0o666)
        open_socket.listen(1)
        assert as_nobody(base / "open.sock") == "connected"
        assert as_nobody(forwarder.path) == (f"{forwarder.path}: permission denied|a forwarded port is reachable "
                                             "only by the user who booted the snapshot")
        forwarder.close()
        ports.close()
        open_socket.close()
    finally:
        shutil.rmtree(base)


def test_the_socket_of_a_forward_is_found_in_the_boot_record():
    info = {"forwards": [{"guest_port": 80, "socket": "/s/ports/guest-80.sock"},
                         {"guest_port": 22, "socket": "/s/ports/guest-22.sock"}]}
    assert str(socket_for(info, 22)) == "/s/ports/guest-22.sock"
    assert socket_for(info, 443) is None and socket_for({}, 80) is None

"""Port forwarding over the agent channel: the real agent and client over a socketpair."""
import os
import pwd
import socket
import threading

import pytest

from vmloader.agent.server import Agent
from vmloader.agent.transport import SocketTransport
from vmloader.bootstrapper.agentclient import AgentClient
from vmloader.bootstrapper.errors import UsageError
from vmloader.bootstrapper.forward import Forward, Forwarder, parse_forward

ME = pwd.getpwuid(os.getuid())


@pytest.mark.parametrize("text, forward", [("8080:80", Forward(8080, 80)), ("0:22", Forward(0, 22))])
def test_forwards_are_host_port_colon_guest_port(text, forward):
    assert parse_forward(text) == forward


@pytest.mark.parametrize("text", ["80", "a:80", "8080:0", "70000:80", ":80", "8080:"])
def test_malformed_forwards_say_what_is_expected(text):
    with pytest.raises(UsageError, match="expected HOST_PORT:GUEST_PORT"):
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


def test_connections_to_the_host_port_reach_the_guest_port_concurrently(client):
    forwarder = Forwarder(client, Forward(0, guest_service()))
    replies = {}

    def ask(n):
        with socket.create_connection(("127.0.0.1", forwarder.forward.host_port), timeout=10) as conn:
            conn.sendall(f"request-{n}\n".encode())
            replies[n] = conn.makefile("rb").readline()
    threads = [threading.Thread(target=ask, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    forwarder.close()
    assert replies == {n: f"request-{n}"[::-1].encode() + b"\n" for n in range(5)}


def test_a_host_port_in_use_is_a_clear_error(client):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    with pytest.raises(UsageError, match="cannot listen on 127.0.0.1"):
        Forwarder(client, Forward(busy.getsockname()[1], 80))
    busy.close()

"""A guest that stops reading or a request abandoned mid-stream never leaves the host waiting for ever.

Each case runs in a thread joined with a deadline: without the fix the call under test blocks
for good, and the join fails the test instead of hanging the suite.
"""
import io
import queue
import socket
import threading
import time

import pytest

from vmloader import protocol as P
from vmloader.bootstrapper import agentclient
from vmloader.bootstrapper.agentclient import AgentClient, ExecTimeout
from vmloader.bootstrapper.errors import AgentError, GuestTimeout


def returns_within(seconds: float, call):
    """call() in a thread: what it returned or raised, or a failed test when it is still blocked."""
    box: queue.Queue = queue.Queue()

    def target():
        try:
            box.put(("value", call()))
        except BaseException as exc:       # handed to the test thread
            box.put(("error", exc))
    threading.Thread(target=target, daemon=True).start()
    try:
        kind, value = box.get(timeout=seconds)
    except queue.Empty:
        pytest.fail(f"still blocked after {seconds} s")
    if kind == "error":
        raise value
    return value


def fill(sock: socket.socket) -> None:
    """Fill the socket's send buffer, as a guest whose agent never opened the port leaves it."""
    sock.setblocking(False)
    try:
        while True:
            sock.send(b"\0" * 4096)
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)


def connected():
    """A client that has had its guest's HELLO (the guest side is a bare socket the test drives)."""
    host, guest = socket.socketpair()
    guest.sendall(P.encode_json(P.HELLO, 0, {"protocol": P.PROTOCOL_VERSION}))
    client = AgentClient(host, heartbeat_timeout=60.0)
    client.handshake(timeout=5)
    return client, host, guest


def answer_once_asked(client: AgentClient, guest: socket.socket, request_id: int, frame: bytes) -> None:
    """Send `frame` from the guest side once the client has opened request `request_id`."""
    def answer():
        deadline = time.monotonic() + 30
        while request_id not in client._waiters and time.monotonic() < deadline:
            time.sleep(0.01)
        guest.sendall(frame)
    threading.Thread(target=answer, daemon=True).start()


def test_a_handshake_with_a_guest_that_reads_nothing_times_out_instead_of_blocking_in_send():
    host, guest = socket.socketpair()
    fill(host)
    client = AgentClient(host)
    with pytest.raises(GuestTimeout, match="no answer from the guest agent within 2 s"):
        returns_within(30, lambda: client.handshake(timeout=2))
    guest.close()


def test_a_send_the_guest_takes_none_of_fails_after_the_stall_limit(monkeypatch):
    monkeypatch.setattr(agentclient, "SEND_STALL", 1.0)
    client, host, guest = connected()
    fill(host)
    started = time.monotonic()
    with pytest.raises(AgentError, match="took nothing we sent for 1 s"):
        returns_within(30, lambda: client.shutdown(timeout=5))
    assert time.monotonic() - started < 10
    guest.close()


def test_frames_of_an_abandoned_request_do_not_stop_the_replies_to_the_next_one():
    """The reader was left waiting to put into the full queue of a request that had ended: every
    later reply then sat behind it."""
    client, _, guest = connected()
    request_id, waiter = client._new_request()
    for _ in range(agentclient.QUEUE_FRAMES + 5):         # more than the request's queue holds
        guest.sendall(P.encode(P.STDOUT, request_id, b"x" * 100))
    deadline = time.monotonic() + 10
    while not waiter.full():
        assert time.monotonic() < deadline, "the reader never filled the queue"
        time.sleep(0.05)
    client._done(request_id)                                # abandoned, as after an output limit
    answer_once_asked(client, guest, request_id + 1, P.encode(P.OK, request_id + 1, b"{}"))
    returns_within(30, lambda: client.shutdown(timeout=10))
    guest.close()


def test_a_command_that_never_reports_its_exit_after_the_kill_ends_the_exec_with_a_timeout(monkeypatch):
    monkeypatch.setattr(agentclient, "KILL_DRAIN", 0.2)
    client, _, guest = connected()

    def exec_():
        return client.exec(["sleep", "inf"], env={}, user="vmloader", stdin=None, stdout=io.BytesIO(),
                           stderr=io.BytesIO(), deadline=time.monotonic() + 0.5)
    with pytest.raises(ExecTimeout, match="did not end within 1 s of being killed"):
        returns_within(30, exec_)
    guest.close()

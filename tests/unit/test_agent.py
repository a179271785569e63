"""The real agent and the real host client, talking over a socketpair.

The "guest" is this machine: commands run as real subprocesses. The guest
user lookup is injected so the tests need no `vmloader` user on the host.
"""
import hashlib
import io
import os
import pwd
import signal
import socket
import threading
import time

import pytest

from vmloader import protocol as P
from vmloader.agent.server import Agent, Channel, Stream
from vmloader.agent.transport import SocketTransport
from vmloader.bootstrapper.agentclient import AgentClient, ExecTimeout, PtySpec
from vmloader.bootstrapper.errors import AgentError

ME = pwd.getpwuid(os.getuid())


@pytest.fixture
def pair(tmp_path):
    host, guest = socket.socketpair()
    powered_off = threading.Event()
    agent = Agent(SocketTransport(guest), workdir=str(tmp_path / "work"), lookup_user=lambda name: ME,
                  poweroff=powered_off.set)
    threading.Thread(target=agent.serve, daemon=True).start()
    client = AgentClient(host, heartbeat_timeout=3.0)
    client.handshake(timeout=5)
    client.powered_off = powered_off
    yield client
    client.close()
    guest.close()


def run(client, *argv, stdin=None, deadline=None):
    out, err = io.BytesIO(), io.BytesIO()
    result = client.exec(list(argv), env={"GREETING": "hi"}, user="vmloader", stdin=stdin,
                         stdout=out, stderr=err, deadline=deadline)
    return result, out.getvalue(), err.getvalue()


def test_handshake_returns_the_agents_description(pair):
    assert pair.info.protocol == P.PROTOCOL_VERSION
    assert pair.info.python and pair.info.kernel and pair.info.hostname and pair.info.pid == os.getpid()


@pytest.mark.parametrize("code", [0, 7])
def test_exit_codes_come_back(pair, code):
    result, _, _ = run(pair, "sh", "-c", f"exit {code}")
    assert (result.exit_code, result.signal, result.error) == (code, None, None)


def test_death_by_signal_is_reported_as_the_signal(pair):
    result, _, _ = run(pair, "sh", "-c", "kill -9 $$")
    assert result.signal == 9 and result.exit_code is None


def test_a_missing_command_is_not_found(pair):
    result, _, _ = run(pair, "definitely-not-a-command")
    assert result.error == "not_found" and "definitely-not-a-command" in result.message


def test_a_file_without_the_x_bit_is_not_executable(pair, tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho no\n")
    os.chmod(script, 0o644)
    result, _, _ = run(pair, str(script))
    assert result.error == "not_executable"


def test_stdout_and_stderr_are_separate_and_the_environment_arrives(pair):
    result, out, err = run(pair, "sh", "-c", 'echo "out $GREETING"; echo err >&2')
    assert (out, err) == (b"out hi\n", b"err\n")


def test_twenty_megabytes_of_binary_output_arrive_intact(pair):
    script = "head -c 20000000 /dev/urandom > blob; sha256sum blob >&2; cat blob"
    result, out, err = run(pair, "sh", "-c", script)
    assert result.exit_code == 0
    assert len(out) == 20_000_000
    assert err.split()[0].decode() == hashlib.sha256(out).hexdigest()


def test_stdin_is_forwarded_until_eof(pair):
    result, out, _ = run(pair, "wc", "-c", stdin=io.BytesIO(b"y" * 200_000))
    assert out.strip() == b"200000"


def test_files_round_trip_through_put_and_get(pair, tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(300_000))
    pair.put_file(str(src), "sub/in.bin", mode=0o600)
    assert oct(os.stat(tmp_path / "work" / "sub" / "in.bin").st_mode & 0o777) == "0o600"
    back = pair.get_file("sub/in.bin", str(tmp_path / "back"))
    assert open(back, "rb").read() == src.read_bytes()


def test_listing_the_work_dir_shows_files_with_sizes_and_never_follows_links(pair, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("12345")
    pair.put_file(str(src), "in.txt")
    pair.put_file(str(src), "sub/deeper.txt")
    os.symlink("/etc/passwd", tmp_path / "work" / "link")
    entries = {e.name: e for e in pair.list_dir(".")}
    assert entries["in.txt"].type == "file" and entries["in.txt"].size == 5
    assert entries["sub"].type == "dir" and entries["link"].type == "link"
    assert entries["in.txt"].mtime_ns > 0


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../x", ""])
def test_get_refuses_paths_that_could_escape_the_destination(pair, tmp_path, bad):
    with pytest.raises(AgentError, match="refusing"):
        pair.get_file(bad, str(tmp_path / "back"))


def test_get_refuses_to_write_through_a_symlink(pair, tmp_path):
    (tmp_path / "back").mkdir()
    os.symlink("/etc", tmp_path / "back" / "link")
    with pytest.raises(AgentError, match="symlink"):
        pair.get_file("link/passwd", str(tmp_path / "back"))


def test_get_stops_at_the_size_limit_and_leaves_no_partial_file(pair, tmp_path):
    (tmp_path / "work").mkdir(exist_ok=True)
    (tmp_path / "work" / "big").write_bytes(b"z" * 500_000)
    with pytest.raises(AgentError, match="limit"):
        pair.get_file("big", str(tmp_path / "back"), max_bytes=100_000)
    assert list((tmp_path / "back").iterdir()) == []


def test_a_deadline_kills_the_command_and_raises_exec_timeout(pair):
    started = time.monotonic()
    with pytest.raises(ExecTimeout):
        run(pair, "sleep", "1000", deadline=time.monotonic() + 1)
    assert time.monotonic() - started < 10


def test_a_daemon_holding_stdout_open_does_not_block_the_exit(pair):
    started = time.monotonic()
    result, out, _ = run(pair, "sh", "-c", "sleep 30 & echo started")
    assert result.exit_code == 0 and out == b"started\n"
    assert time.monotonic() - started < 8


def test_shutdown_is_acknowledged_then_powers_off(pair):
    pair.shutdown()
    assert pair.powered_off.wait(5)


def test_a_silent_guest_is_detected_by_missing_heartbeats():
    host, guest = socket.socketpair()
    guest.sendall(P.encode_json(P.HELLO, 0, {"protocol": P.PROTOCOL_VERSION}))
    client = AgentClient(host, heartbeat_timeout=1.0)
    client.handshake(timeout=5)
    started = time.monotonic()
    with pytest.raises(AgentError, match="stopped responding"):
        run(client, "true")
    assert time.monotonic() - started < 5
    guest.close()


def hostile(frames: bytes):
    host, guest = socket.socketpair()
    guest.sendall(P.encode_json(P.HELLO, 0, {"protocol": P.PROTOCOL_VERSION}))
    client = AgentClient(host, heartbeat_timeout=5.0)
    client.handshake(timeout=5)
    threading.Timer(0.3, guest.sendall, args=(frames,)).start()
    return client, guest


@pytest.mark.parametrize("frames, message", [
    (bytes(bytearray(P.encode(P.STDOUT, 1, b"abc"))[:-1]) + b"X", "checksum"),
    (P.encode(P.STDOUT, 99, b"abc"), "unknown request"),
    (P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, P.STDOUT, 1, 1 << 30, 0), "exceeds"),
    (P.encode(P.OK, 1)[:3] + bytes([77]) + P.encode(P.OK, 1)[4:], "unknown frame type|checksum"),
])
def test_a_hostile_agent_gets_a_clear_error_not_a_hang(frames, message):
    client, guest = hostile(frames)
    with pytest.raises(AgentError, match=message):
        run(client, "true")
    guest.close()


# -- terminals and TCP streams (snapshot shell, --forward) ---------------------
def run_on_pty(client, script, rows=30, cols=100, stdin=None, on_start=None):
    from vmloader.bootstrapper.agentclient import PtySpec
    out = io.BytesIO()
    result = client.exec(["sh", "-c", script], env={}, user="vmloader", stdin=stdin, stdout=out,
                         stderr=io.BytesIO(), pty=PtySpec(rows, cols, "vt100"), on_start=on_start)
    return result, out.getvalue().decode()


def test_a_command_on_a_pty_sees_a_terminal_of_the_requested_size(pair):
    result, out = run_on_pty(pair, 'stty size; test -t 0 && echo tty; echo "TERM=$TERM"')
    assert result.exit_code == 0
    assert "30 100" in out and "tty" in out and "TERM=vt100" in out


def test_a_window_size_change_reaches_the_terminal(pair):
    read_end, write_end = os.pipe()
    started = []

    def resize_then_continue(request_id):
        started.append(request_id)
        pair.resize(request_id, 40, 120)
        os.write(write_end, b"go\n")
        os.close(write_end)
    result, out = run_on_pty(pair, "read x; stty size", stdin=os.fdopen(read_end, "rb"),
                             on_start=resize_then_continue)
    assert started and "40 120" in out


def test_ctrl_c_on_the_pty_interrupts_the_foreground_command(pair):
    read_end, write_end = os.pipe()
    threading.Timer(1.5, lambda: (os.write(write_end, b"\x03"), os.close(write_end))).start()
    started = time.monotonic()
    result, out = run_on_pty(pair, 'trap "echo interrupted; exit 3" INT; echo ready; sleep 30 & wait',
                             stdin=os.fdopen(read_end, "rb"))
    assert time.monotonic() - started < 20
    assert result.exit_code == 3 and "interrupted" in out, (result, out)


def signal_sets(status_text):
    fields = dict(line.split(":\t", 1) for line in status_text.splitlines() if ":\t" in line)
    return int(fields["SigIgn"], 16), int(fields["SigBlk"], 16)


def test_commands_start_with_default_signal_dispositions_and_an_empty_mask(tmp_path):
    """Whatever the agent inherited (here: SIGINT and SIGTERM ignored, SIGUSR1 blocked), the
    command it spawns starts clean: nothing ignored, nothing blocked."""
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    try:
        ignored, blocked = signal_sets(open("/proc/self/status").read())
        assert ignored & (1 << (signal.SIGINT - 1)) and blocked & (1 << (signal.SIGUSR1 - 1))
        host, guest = socket.socketpair()
        agent = Agent(SocketTransport(guest), workdir=str(tmp_path), lookup_user=lambda name: ME,
                      poweroff=lambda: None)
        threading.Thread(target=agent.serve, daemon=True).start()   # inherits the mask above
        client = AgentClient(host, heartbeat_timeout=3.0)
        client.handshake(timeout=5)
        results = [run(client, "cat", "/proc/self/status"),
                   run_on_pty(client, "exec cat /proc/self/status")]
        client.close()
        guest.close()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
    (plain, out, _), (on_pty, pty_out) = results
    assert plain.exit_code == 0 and on_pty.exit_code == 0
    # The C library reserves a few real-time signals (32 and 33 with glibc: no process can set them
    # through libc, and glibc programs install their own handlers). A parent such as make may have
    # them ignored; they are not ours to reset, so they are left out of the comparison.
    settable = sum(1 << (n - 1) for n in signal.valid_signals() if 0 < n < signal.NSIG)
    for status in (out.decode(), pty_out.replace("\r\n", "\n")):
        ignored, blocked = signal_sets(status)
        assert (ignored & settable, blocked & settable) == (0, 0), (hex(ignored), hex(blocked))


def test_the_hello_announces_features_and_no_busy_requests(pair):
    assert {"pty", "connect", "list"} <= set(pair.info.features)
    assert pair.info.busy == ()


def test_a_tcp_stream_reaches_a_guest_port_both_ways():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def echo_upper():
        conn, _ = server.accept()
        with conn:
            while True:
                data = conn.recv(4096)
                if not data:
                    break
                conn.sendall(data.upper())
    threading.Thread(target=echo_upper, daemon=True).start()
    host, guest = socket.socketpair()
    agent = Agent(SocketTransport(guest), workdir="/tmp", lookup_user=lambda name: ME, poweroff=lambda: None)
    threading.Thread(target=agent.serve, daemon=True).start()
    client = AgentClient(host, heartbeat_timeout=3.0)
    client.handshake(timeout=5)
    stream = client.connect(server.getsockname()[1])
    stream.send(b"hello over the channel")
    stream.send_eof()
    received = b""
    while True:
        data = stream.recv()
        if not data:
            break
        received += data
    stream.close()
    assert received == b"HELLO OVER THE CHANNEL"
    client.close()


def test_a_stream_to_a_closed_guest_port_says_so(pair):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    stream = pair.connect(port)
    with pytest.raises(AgentError, match=f"127.0.0.1:{port}"):
        stream.recv()


def test_a_fifo_is_never_copied_back_and_does_not_block_the_agent(pair, tmp_path):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    os.mkfifo(work / "pipe")
    started = time.monotonic()
    with pytest.raises(AgentError, match="not a file"):
        pair.get_file("pipe", str(tmp_path / "back"))
    assert time.monotonic() - started < 5
    result, out, _ = run(pair, "echo", "still-serving")
    assert out == b"still-serving\n"


def test_a_host_talks_to_an_agent_of_the_first_release():
    """The first release's HELLO (no features, no busy list), replayed: the new host handshakes,
    knows the agent cannot do ptys, and runs a command."""
    host, guest = socket.socketpair()
    first_hello = (b'{"protocol": 1, "agent": "0.1.0", "python": "3.9.2", "kernel": "5.10.0-26-amd64", '
                   b'"hostname": "debian", "pid": 301}')
    guest.sendall(P.encode(P.HELLO, 0, first_hello))
    client = AgentClient(host, heartbeat_timeout=5.0)
    assert client.handshake(timeout=5).pid == 301
    assert not client.supports("pty")
    with pytest.raises(AgentError, match="no terminal support"):
        client.exec(["sh"], env={}, user="vmloader", stdin=None, stdout=io.BytesIO(), stderr=io.BytesIO(),
                    pty=PtySpec())
    reader = P.FrameReader(guest.recv)

    def answer():
        while True:
            frame = reader.read_frame(resync=True)
            if frame.type == P.EXEC:
                guest.sendall(P.encode(P.EXIT, frame.request_id, b'{"code": 4}'))
                return
    threading.Thread(target=answer, daemon=True).start()
    result = client.exec(["true"], env={}, user="vmloader", stdin=None, stdout=io.BytesIO(), stderr=io.BytesIO())
    assert result.exit_code == 4
    client.close()
    guest.close()


def test_an_agent_runs_what_a_host_of_the_first_release_asks(tmp_path):
    """EXEC as the first release sent it (no shell, no pty), raw bytes in, EXIT bytes out."""
    host, guest = socket.socketpair()
    agent = Agent(SocketTransport(guest), workdir=str(tmp_path), lookup_user=lambda name: ME, poweroff=lambda: None)
    threading.Thread(target=agent.serve, daemon=True).start()
    host.sendall(P.encode(P.EXEC, 1, b'{"argv": ["sh", "-c", "exit 5"], "env": {"A": "b"}, "user": "vmloader", '
                                     b'"cwd": null}') + P.encode(P.STDIN_EOF, 1))
    reader = P.FrameReader(host.recv)
    while True:
        frame = reader.read_frame(resync=True)
        if frame.type == P.EXIT:
            break
    assert (frame.request_id, frame.payload) == (1, b'{"code": 5}')
    host.close()
    guest.close()


def test_a_malformed_request_is_refused_with_an_error_naming_the_field(pair):
    request_id, waiter = pair._new_request()
    pair._send(P.EXEC, request_id, b'{"argv": "rm -rf /", "env": {}, "user": "vmloader"}')
    with pytest.raises(AgentError, match="refused a request: ProtocolError: EXEC field 'argv' must be a list"):
        pair._next(waiter)


def test_a_stream_whose_host_is_gone_when_its_guest_port_closes_ends_quietly_and_closes_its_socket():
    """The host went away (its end of the channel closed) before the guest's connection ended:
    the stream's pump cannot say EXIT, and still closes the guest's connection (no thread dies)."""
    host, guest = socket.socketpair()
    host.close()
    service, relayed = socket.socketpair()
    died = []
    hook, threading.excepthook = threading.excepthook, died.append
    try:
        stream = Stream(Channel(SocketTransport(guest)), 7, relayed)
        service.close()                                 # the guest's service ends the connection
        assert stream.closed.wait(30)
        deadline = time.monotonic() + 30
        while relayed.fileno() != -1 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        threading.excepthook = hook
    assert relayed.fileno() == -1
    assert died == []
    guest.close()

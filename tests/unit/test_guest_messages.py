"""Guest text that enters an error message (agent errors, console lines, guest file names) is escaped
and capped where it enters, so the CLI's text and --json carry clean text."""
import io
import json
import socket
import threading
from types import SimpleNamespace

import pytest

from vmloader import protocol as P
from vmloader.bootstrapper.agentclient import GUEST_TEXT_MAX, AgentClient, safe_destination
from vmloader.bootstrapper.errors import AgentError, GuestTimeout, VMLoaderError
from vmloader.bootstrapper.job import JobRunner, _raise_for_spawn_error

EVIL = "\x1b[2J\x1b]0;owned\x07red\rover\x00nul \u202eevil\x9b "
BIG = EVIL + "A" * 10240


def clean(text: str) -> bool:
    return all(line.isprintable() for line in text.split("\n"))


def assert_clean_error(exc: VMLoaderError) -> None:
    assert exc.message.isprintable(), repr(exc.message)
    assert clean(exc.user_text())
    shown = json.dumps(exc.to_dict(), ensure_ascii=False)           # --json, even without ASCII escaping
    assert all(c.isprintable() for c in shown), repr(shown)
    for visible in ("\\x1b[2J", "\\x07", "\\rover", "\\x00nul", "\\u202eevil", "\\u009b"):
        assert visible in exc.message, (visible, exc.message)


def client_answering(*frames: bytes) -> tuple:
    """A client whose "guest" says hello, then sends `frames` once the first request is out."""
    host, guest = socket.socketpair()
    guest.sendall(P.encode_json(P.HELLO, 0, {"protocol": P.PROTOCOL_VERSION}))
    client = AgentClient(host, heartbeat_timeout=5.0)
    client.handshake(timeout=5)
    threading.Timer(0.3, guest.sendall, args=(b"".join(frames),)).start()
    return client, guest


def run(client):
    return client.exec(["true"], env={}, user="vmloader", stdin=None, stdout=io.BytesIO(), stderr=io.BytesIO())


def test_an_agent_error_frame_with_escape_sequences_and_10_kib_is_escaped_and_capped():
    client, guest = client_answering(P.encode_json(P.ERROR, 1, {"message": BIG}))
    with pytest.raises(AgentError) as info:
        run(client)
    assert_clean_error(info.value)
    assert len(info.value.message.encode()) < GUEST_TEXT_MAX + 100
    guest.close()


def test_an_exec_failure_message_from_the_agent_is_escaped():
    client, guest = client_answering(P.encode_json(P.EXIT, 1, {"code": None, "error": "spawn", "message": BIG}))
    result = run(client)
    assert result.message.isprintable() and len(result.message.encode()) <= GUEST_TEXT_MAX
    with pytest.raises(AgentError) as info:
        _raise_for_spawn_error(result)
    assert_clean_error(info.value)
    guest.close()


def test_a_protocol_version_the_guest_made_up_is_escaped():
    host, guest = socket.socketpair()
    guest.sendall(P.encode_json(P.HELLO, 0, {"protocol": EVIL}))
    with pytest.raises(AgentError) as info:
        AgentClient(host).handshake(timeout=5)
    assert_clean_error(info.value)
    guest.close()


def test_a_guest_file_name_in_a_refusal_is_escaped(tmp_path):
    with pytest.raises(AgentError) as info:
        safe_destination(str(tmp_path), "../" + EVIL)
    assert_clean_error(info.value)


def console_job(tmp_path, text: bytes):
    log = tmp_path / "console.log"
    log.write_bytes(b"[    1.0] booting\r\n" + text + b"\r\n[    2.0] after\r\n")
    return SimpleNamespace(console_log=log, spec=SimpleNamespace(snapshot="on-failure"), domain=None, overlay=None)


def test_a_crash_line_the_guest_wrote_is_escaped_in_the_error(tmp_path):
    job = console_job(tmp_path, ("BUG: " + BIG).encode())
    exc = JobRunner._explain_guest_death(None, job, AgentError("the guest agent restarted"))
    assert "; the guest console says: BUG: \\x1b[2J" in exc.message
    assert_clean_error(exc)
    assert len(exc.message.encode()) < GUEST_TEXT_MAX + 100


def test_the_console_tail_of_a_boot_failure_keeps_its_lines_and_escapes_the_rest(tmp_path):
    job = console_job(tmp_path, BIG.encode() + b"\xff\xfe")
    exc = JobRunner._boot_failure(None, job, "no answer")
    assert isinstance(exc, GuestTimeout)
    assert "\n[    1.0] booting\n" in exc.message and exc.message.endswith("\n[    2.0] after")
    assert clean(exc.message) and clean(exc.user_text())
    assert "\\x1b[2J" in exc.message and "\\u202eevil" in exc.message


def test_an_exit_with_wrongly_typed_fields_is_a_clean_agent_error():
    client, guest = client_answering(P.encode_json(P.EXIT, 1, {"code": EVIL}))
    with pytest.raises(AgentError, match="malformed message: EXIT field 'code' must be an integer") as info:
        run(client)
    assert_clean_error(info.value)
    guest.close()

"""The guest's console and output tails on a user's terminal: escaped (lines and tabs kept) unless --raw."""
import io
import json
import time

import pytest

from vmloader.bootstrapper import cli
from vmloader.bootstrapper.console import ConsoleFollower, LogEscaper, escape_log
from vmloader.bootstrapper.snapshots import SnapshotMeta, SnapshotStore

HOSTILE = ("[    1.2] booted\r\n"
           "\x1b[2J\x1b[H\x1b]0;owned\x07screen cleared\r\n"
           "progress 10%\rprogress 99%\r\n"
           "\u202eevil\u202c and C1 \x9b31m and NUL \x00 and\ttab\r\r\n"
           "h\u00e9llo \u2603\r\n").encode() + b"bad \xff\xfe bytes\r\n"
ESCAPED = ("[    1.2] booted\n"
           "\\x1b[2J\\x1b[H\\x1b]0;owned\\x07screen cleared\n"
           "progress 10%\\rprogress 99%\n"
           "\\u202eevil\\u202c and C1 \\u009b31m and NUL \\x00 and\ttab\n"
           "h\u00e9llo \u2603\n"
           "bad \\xff\\xfe bytes\n")


def shown_clean(text: str) -> bool:
    return all(part.isprintable() for line in text.split("\n") for part in line.split("\t"))


def test_escape_log_keeps_lines_tabs_and_text_and_escapes_every_control_sequence():
    escaped = escape_log(HOSTILE.decode("utf-8", "surrogateescape"))
    assert escaped == ESCAPED
    assert shown_clean(escaped)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_a_stream_split_anywhere_escapes_exactly_like_the_whole(size):
    escaper = LogEscaper()
    pieces = [escaper.feed(HOSTILE[i:i + size]) for i in range(0, len(HOSTILE), size)]
    assert (b"".join(pieces) + escaper.feed(b"", final=True)).decode() == ESCAPED


def test_a_cr_at_the_very_end_of_the_stream_is_shown_once_the_stream_ends():
    escaper = LogEscaper()
    assert escaper.feed(b"prompt\r") == b"prompt"
    assert escaper.feed(b"", final=True) == b"\\r"


def follow(tmp_path, raw: bool) -> bytes:
    log, out = tmp_path / "console.log", io.BytesIO()
    follower = ConsoleFollower(log, out, raw=raw).start()
    time.sleep(0.3)                          # the watch is on the directory: the log may appear later
    log.write_bytes(HOSTILE)
    follower.stop()                          # copies whatever is left
    return out.getvalue()


def test_following_the_console_escapes_it(tmp_path):
    assert follow(tmp_path, raw=False).decode() == ESCAPED


def test_following_the_console_raw_copies_the_exact_bytes(tmp_path):
    assert follow(tmp_path, raw=True) == HOSTILE


@pytest.fixture
def kept(tmp_path, monkeypatch):
    """A kept snapshot whose console log and output tails the guest filled with escape sequences."""
    monkeypatch.setenv("VMLOADER_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "overlay.qcow2").write_bytes(b"qcow")
    (tmp_path / "console.log").write_bytes(HOSTILE)
    meta = SnapshotMeta(id="job-1", created=1.0, image="debian-12@12.x", image_sha256="a" * 64,
                        base_path="/base", command=["x"], exit_status=1, outcome="failed",
                        user="alice", hostname="worker1", timings={"exec": 1.5})
    snap = SnapshotStore(tmp_path / "state" / "snapshots").preserve(meta, tmp_path / "overlay.qcow2",
                                                                     tmp_path / "console.log")
    (snap.path / "stdout.tail").write_bytes(b"out \x1b[31mred\x1b[0m\n")
    (snap.path / "stderr.tail").write_bytes(b"err \x1b]52;c;cGF5bG9hZA==\x07\n")
    return snap


def test_snapshot_logs_escapes_the_guests_text(kept, capsysbinary):
    assert cli.main(["snapshot", "logs", "job-1"]) == 0
    out = capsysbinary.readouterr().out.decode()
    assert ESCAPED in out and "out \\x1b[31mred\\x1b[0m\n" in out and "err \\x1b]52;c;cGF5bG9hZA==\\x07\n" in out
    assert shown_clean(out)


def test_snapshot_logs_raw_writes_the_exact_bytes(kept, capsysbinary):
    assert cli.main(["snapshot", "logs", "job-1", "--raw"]) == 0
    out = capsysbinary.readouterr().out
    assert HOSTILE in out and b"out \x1b[31mred\x1b[0m\n" in out and b"\x1b]52;c;cGF5bG9hZA==\x07" in out


def test_snapshot_logs_json_carries_the_escaped_text(kept, capsysbinary):
    assert cli.main(["snapshot", "logs", "job-1", "--json"]) == 0
    logs = json.loads(capsysbinary.readouterr().out)
    assert logs["console_tail"] == ESCAPED and shown_clean(logs["stdout_tail"])


def test_snapshot_logs_json_raw_keeps_every_byte(kept, capsysbinary):
    assert cli.main(["snapshot", "logs", "job-1", "--json", "--raw"]) == 0
    logs = json.loads(capsysbinary.readouterr().out)
    assert logs["console_tail"].encode("utf-8", "surrogateescape") == HOSTILE


def test_a_failed_boots_tail_keeps_what_the_guest_said_before_its_panic(tmp_path):
    from vmloader.bootstrapper.console import failure_tail
    log = tmp_path / "console.log"
    trace = [f"[    3.78] trace line {n}" for n in range(40)]
    log.write_text("\r\n".join(["[    3.71] EXT4-fs (vda): mounted", "run-init: /no/such/init: No such file or directory",
                                "[    3.77] Kernel panic - not syncing: Attempted to kill init!"] + trace) + "\r\n")
    shown = failure_tail(log).split("\n")
    assert shown[:3] == ["[    3.71] EXT4-fs (vda): mounted", "run-init: /no/such/init: No such file or directory",
                         "[    3.77] Kernel panic - not syncing: Attempted to kill init!"]
    assert shown[3] == "[...]" and shown[-1] == "[    3.78] trace line 39" and len(shown) <= 3 + 1 + 30
    quiet = tmp_path / "quiet.log"
    quiet.write_text("".join(f"line {n}\r\n" for n in range(50)))
    assert failure_tail(quiet).split("\n") == [f"line {n}" for n in range(20, 50)]

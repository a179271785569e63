"""Guest text is data: a root job writes escape sequences, CRs, NULs and bidi overrides where the host
reads them (its console, its output, an error message, the HoldReason); real boots."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmloader.bootstrapper.condor import HOLD_REASON_MAX

from .faulttable import record_row
from .test_faults import wrapper_env

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]
HOSTILE_TEXT = Path(__file__).with_name("hostile_text.py")
RAW_MARKER = ("guest-text-marker \x1b[2J\x1b[H\x1b]0;owned\x07cleared \x1b[31mred\x1b[0m "
              "progress 10%\rprogress 99% \u202eevil\u202c end").encode()
SHOWN_MARKER = ("guest-text-marker \\x1b[2J\\x1b[H\\x1b]0;owned\\x07cleared \\x1b[31mred\\x1b[0m "
                "progress 10%\\rprogress 99% \\u202eevil\\u202c end\n")
RAW_STDOUT = "stdout \x1b[31mred\x1b[0m \x1b]52;c;cGF5bG9hZA==\x07 \u202eevil\u202c\n".encode()
SHOWN_STDOUT = "stdout \\x1b[31mred\\x1b[0m \\x1b]52;c;cGF5bG9hZA==\\x07 \\u202eevil\\u202c\n"
CONTROLS = [bytes([c]) for c in range(0x20) if c not in (0x09, 0x0A)] + [b"\x7f", "\u202e".encode(), b"\xc2\x9b"]


def controls_in(data: bytes) -> list:
    return [c for c in CONTROLS if c in data]


def run_hostile(vm_env, tmp_path, job_id: str, mode: str, *flags: str) -> subprocess.CompletedProcess:
    shutil.copy(HOSTILE_TEXT, tmp_path / HOSTILE_TEXT.name)
    argv = [sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12", "--root",
            "--job-id", job_id, "--input", HOSTILE_TEXT.name, *flags, "--", "python3", HOSTILE_TEXT.name, mode]
    return subprocess.run(argv, capture_output=True, env=vm_env, cwd=tmp_path, timeout=900, stdin=subprocess.DEVNULL)


def cli(vm_env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", *args], capture_output=True,
                          env=vm_env, timeout=120)


def test_guest_escape_sequences_in_the_console_log_are_escaped_unless_raw(vm_env, state_dir, tmp_path):
    run = run_hostile(vm_env, tmp_path, "text-console", "console", "--console")
    assert run.returncode == 3, run.stderr.decode(errors="replace")
    assert SHOWN_MARKER.encode() in run.stderr                    # --console, live, escaped
    assert RAW_MARKER not in run.stderr and controls_in(run.stderr) == []
    assert run.stdout == RAW_STDOUT                               # the command's own output stays its own
    [snap] = [s["id"] for s in json.loads(cli(vm_env, "snapshot", "list", "--json").stdout)]

    shown = cli(vm_env, "snapshot", "logs", snap)
    assert shown.returncode == 0, shown.stderr
    assert SHOWN_MARKER.encode() in shown.stdout and SHOWN_STDOUT.encode() in shown.stdout
    assert controls_in(shown.stdout) == [], controls_in(shown.stdout)
    as_json = json.loads(cli(vm_env, "snapshot", "logs", snap, "--json").stdout)
    assert SHOWN_MARKER in as_json["console_tail"] and as_json["stdout_tail"] == SHOWN_STDOUT
    raw = cli(vm_env, "snapshot", "logs", snap, "--raw")
    assert RAW_MARKER + b"\r" in raw.stdout and RAW_STDOUT in raw.stdout     # the exact bytes, CRLF and all

    live_raw = run_hostile(vm_env, tmp_path, "text-console-raw", "console", "--console", "--raw")
    assert live_raw.returncode == 3 and RAW_MARKER in live_raw.stderr
    record_row(fault="guest escape sequences in the console log",
               exit=run.returncode, outcome="failed (the command's exit 3)", phase="exec",
               message="snapshot logs and run --console show " + SHOWN_MARKER.strip(),
               kept="console log with the guest's exact bytes (snapshot logs --raw, --console --raw)")


def test_guest_text_with_esc_cr_nul_and_10_kib_in_an_error_becomes_a_clean_capped_hold(vm_env, state_dir,
                                                                                       tmp_path):
    sandbox, chirp_log, env = wrapper_env(vm_env, tmp_path, 'VMImage = "debian-12"\nVMLoaderRoot = true')
    shutil.copy(HOSTILE_TEXT, sandbox / HOSTILE_TEXT.name)
    run = subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", "condor", "wrapper", "--",
                          str(sandbox / HOSTILE_TEXT.name), "crash"], capture_output=True, env=env, cwd=sandbox,
                         timeout=900, stdin=subprocess.DEVNULL)
    assert run.returncode == 125, run.stderr.decode(errors="replace")
    assert b"Traceback" not in run.stderr and b"ValueError" not in run.stderr
    said = run.stderr.decode()
    assert "the guest console says: BUG: guest-text-crash \\x1b[2J\\x1b[31mred\\rover\\x00nul \\u202eevil" in said
    assert controls_in(run.stderr) == [] and len(run.stderr) < 4096      # escaped and capped (not 10 KiB)
    held = dict(line.split("=", 1) for line in chirp_log.read_text().splitlines())
    literal = held["VMLoaderHoldReason"]
    assert literal.startswith('"') and literal.endswith('"') and len(literal.encode()) <= HOLD_REASON_MAX
    reason = literal[1:-1].replace('\\"', '"')                  # old ClassAd syntax, as chirp reads it
    assert reason.isprintable(), repr(reason)
    assert "[exec]: the guest agent restarted" in reason
    assert "BUG: guest-text-crash \\x1b[2J\\x1b[31mred\\rover\\x00nul \\u202eevil" in reason
    assert "AAAA... (hint: this is not the command's own exit status" in reason

"""The hold reason carries guest text: escaped, capped, a valid ClassAd string, never a crash.

condor_chirp set_job_attr parses the old ClassAd syntax (seen on HTCondor 23.9: a backslash is
itself, only \\" is an escape), so that is how the literal is checked here."""
import json

import pytest

from vmloader.bootstrapper import classad
from vmloader.bootstrapper.condor import HOLD_ATTR, HOLD_REASON_MAX, Chirp, _hold, hold_reason

HOSTILE = "BUG: \x1b[2J\x1b[31mred\rover\x00nul \u202eevil\x9b1m tab\there\nline2 " + "A" * 10240
RECORD_ARGV = """#!/usr/bin/env python3
import json, sys
with open(sys.argv[0] + ".log", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def literal(reason: str) -> bytes:
    return classad.quote_old(reason).encode("utf-8")


def read_old(literal: str) -> str:
    """An old-syntax string literal's value (what condor_q -af HoldReason prints)."""
    assert literal[0] == literal[-1] == '"' and "\n" not in literal, literal
    out, i, body = [], 0, literal[1:-1]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body) and body[i + 1] == '"':
            out.append('"')
            i += 2
            continue
        assert body[i] != '"', "an unescaped quote ends the literal early"
        out.append(body[i])
        i += 1
    return "".join(out)


def test_esc_cr_nul_bidi_and_10_kib_become_a_clean_capped_valid_classad_string():
    reason = hold_reason("slot1@vm1@worker", "exec", HOSTILE, "see the console log")
    assert len(literal(reason)) <= HOLD_REASON_MAX
    assert len(literal(reason)) > HOLD_REASON_MAX - 16          # the room is used, not thrown away
    assert reason.isprintable(), repr(reason)                     # no ESC, CR, NUL, C1, bidi, newline
    assert read_old(classad.quote_old(reason)) == reason          # one string literal, round-trips
    for shown in ("\\x1b[2J", "\\x1b[31mred", "\\rover", "\\x00nul", "\\u202eevil", "\\u009b1m",
                  "\\there", "\\nline2"):
        assert shown in reason, (shown, reason)
    assert reason.startswith("vmloader on slot1@vm1@worker [exec]: BUG: ")
    assert reason.endswith("... (hint: see the console log)")     # the message is cut, the hint kept


def test_a_short_reason_is_unchanged():
    reason = hold_reason("slot1@w", "image", "unknown image 'debian-99'", "see vmloader images list")
    assert reason == "vmloader on slot1@w [image]: unknown image 'debian-99' (hint: see vmloader images list)"


def test_text_escaped_where_it_entered_the_message_is_not_escaped_twice():
    reason = hold_reason("w", None, "the guest console says: BUG: \\x1b[31m and a \\ backslash", None)
    assert reason == "vmloader on w: the guest console says: BUG: \\x1b[31m and a \\ backslash"


@pytest.mark.parametrize("filler", ["é", "\U0001F600", '"', "\\", "\x1b"])
def test_the_cap_counts_quoted_bytes_and_never_cuts_a_character_or_an_escape(filler):
    reason = hold_reason("w", "exec", filler * 5000, "h" * 1000)
    assert len(literal(reason)) <= HOLD_REASON_MAX
    assert read_old(classad.quote_old(reason)) == reason
    body = reason[len("vmloader on w [exec]: "):reason.index("...")]
    unit = "\\x1b" if filler == "\x1b" else filler
    assert body == unit * (len(body) // len(unit))                 # whole characters, whole escapes only
    assert len(classad.quote_old(reason.split(" (hint: ")[1]).encode()) <= 170   # the hint is capped too


def test_a_hostile_worker_name_or_phase_is_escaped_and_capped():
    reason = hold_reason("slot1@\x1b]0;owned\x07" + "w" * 600, "ex\x00ec", "m", None)
    assert reason.isprintable() and "\\x1b]0;owned\\x07" in reason
    assert len(literal(reason)) <= HOLD_REASON_MAX and reason.endswith("...m")


def test_hold_passes_nul_and_10_kib_through_a_real_chirp_process_as_one_short_clean_argument(tmp_path):
    chirp = tmp_path / "condor_chirp"
    chirp.write_text(RECORD_ARGV)
    chirp.chmod(0o755)
    _hold(Chirp(str(chirp)), "slot1@vm1@worker", "exec", HOSTILE, "hint\x00")
    (argv,) = [json.loads(line) for line in (tmp_path / "condor_chirp.log").read_text().splitlines()]
    assert argv[:2] == ["set_job_attr", HOLD_ATTR]
    command = " ".join(argv).encode("utf-8")                 # what condor_chirp formats into its 1024-byte buffer
    assert len(command) < 600, len(command)
    value = read_old(argv[2])
    assert value.isprintable() and "\\x00nul" in value and "hint\\x00" in value


def test_chirp_set_never_raises_on_a_nul(tmp_path):
    assert Chirp("/bin/true").set("Attr", "a\x00b") is False     # subprocess refuses the argv: no traceback


def test_chirp_command_stays_well_under_the_buffer_for_any_message():
    for message in (HOSTILE, "\x00" * 20000, "\u202e" * 20000, '"\\' * 20000):
        reason = hold_reason("slot1@" + "x" * 300, "phase" * 40, message, "\x1b" * 500)
        command = f"set_job_attr {HOLD_ATTR} {classad.quote_old(reason)}\n".encode("utf-8")
        assert len(command) <= HOLD_REASON_MAX + 40 < 1024


@pytest.mark.parametrize("text", ['plain', 'say "hi"', 'back\\slash \\x1b', 'ends in \\', 'quote after \\"',
                                  'two\nlines'])
def test_quote_old_reads_back_in_the_old_syntax(text):
    assert read_old(classad.quote_old(text)).rstrip() == text.replace("\n", " ").rstrip()


def test_a_hold_reason_with_quotes_and_a_last_backslash_stays_one_literal():
    reason = hold_reason("w", None, 'write +VMImage = "debian-12" \\', None)
    assert read_old(classad.quote_old(reason)).rstrip() == reason
    assert len(literal(reason)) <= HOLD_REASON_MAX

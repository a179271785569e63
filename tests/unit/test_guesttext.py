from vmloader.bootstrapper.guesttext import cap, escape, escape_keep_lines


def test_control_characters_become_visible_escapes():
    assert escape("a\x1b[31mb\rc\x00d\x7f") == "a\\x1b[31mb\\rc\\x00d\\x7f"


def test_a_newline_cannot_forge_a_line_and_a_backslash_stays_unambiguous():
    assert escape("x\nD /etc/shadow") == "x\\nD /etc/shadow"
    assert escape("a\\nb") == "a\\\\nb"


def test_c1_controls_bidi_overrides_and_undecodable_bytes_are_escaped():
    assert escape("\u0085\u202etxt.exe") == "\\u0085\\u202etxt.exe"
    assert escape(b"ok\xff\x9b") == "ok\\xff\\x9b"


def test_printable_text_is_unchanged():
    assert escape("héllo wörld ✓") == "héllo wörld ✓"


def test_keep_lines_escapes_within_lines_only():
    assert escape_keep_lines("one\x1b]0;t\x07\ntwo") == "one\\x1b]0;t\\x07\ntwo"


def test_cap_cuts_on_a_character_boundary_and_marks_the_cut():
    assert cap("short", 512) == "short"
    capped = cap("é" * 1000, 512)
    assert len(capped.encode()) <= 512 and capped.endswith("...")

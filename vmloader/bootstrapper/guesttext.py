"""Text that came from a guest (or a user) is data: shown escaped, never interpreted.

A guest can be root in its VM and put any bytes in its console, its agent's
messages and its file names. Before such text reaches a terminal, a job ad or a
line-oriented output, control characters (C0, DEL, C1), bidirectional overrides
and undecodable bytes become visible escapes, so it cannot move the cursor, recolour
the screen, forge a line or crash a consumer that stops at NUL.
"""
import unicodedata
from typing import Union

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:                 # an undecodable byte (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp"):   # C1, bidi overrides, separators
        return f"\\u{code:04x}"
    return char


def escape(text: Union[str, bytes]) -> str:
    """`text` with every control or format character written as a visible escape."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    return "".join(_escape_char(c) if not (c.isprintable() and c != "\\") else c for c in text)


def escape_keep_lines(text: Union[str, bytes]) -> str:
    """Like `escape`, but newlines stay newlines (a log shown on a terminal)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    return "\n".join(escape(line) for line in text.split("\n"))


def cap(text: str, max_bytes: int, marker: str = "...") -> str:
    """`text` cut to at most `max_bytes` of UTF-8, on a character boundary, `marker` appended when cut."""
    if len(text.encode("utf-8", "surrogateescape")) <= max_bytes:
        return text
    room = max_bytes - len(marker.encode())
    cut = text.encode("utf-8", "surrogateescape")[:max(room, 0)].decode("utf-8", "ignore")
    return cut + marker

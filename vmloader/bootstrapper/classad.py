"""Just enough of the ClassAd language to read a job or machine ad file.

HTCondor hands the job wrapper its ad as `Name = value` lines (`.job.ad`,
`.machine.ad`). We need the literal values (strings, numbers, booleans,
undefined) of a few attributes; anything else is kept as `Expr` text. The
real bindings (`classad2`) are not required on a worker, so this stays small
and stdlib-only.
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?)$")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "/": "/"}


@dataclass(frozen=True)
class Expr:
    """An attribute whose value is an expression, not a literal."""
    text: str


class Undefined:
    def __repr__(self) -> str:
        return "undefined"


UNDEFINED = Undefined()


def parse_value(text: str) -> Any:
    text = text.strip()
    lower = text.lower()
    if lower == "true":
        return True
    if lower == "false":
        return False
    if lower == "undefined":
        return UNDEFINED
    if _NUMBER.match(text):
        return float(text) if any(c in text for c in ".eE") else int(text)
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        value = _string(text)
        if value is not None:
            return value
    return Expr(text)


def _string(text: str):
    out, i = [], 1
    while i < len(text) - 1:
        c = text[i]
        if c == '"':
            return None                          # "a" + "b": an expression, not one literal
        if c == "\\" and i + 1 < len(text) - 1:
            out.append(_ESCAPES.get(text[i + 1], text[i + 1]))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def parse_ad(text: str) -> Dict[str, Any]:
    """Attribute names are case-insensitive in ClassAds: keys are lower-cased."""
    ad: Dict[str, Any] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not name or not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", name):
            continue
        ad[name.lower()] = parse_value(value)
    return ad


def read_ad(path: Path) -> Dict[str, Any]:
    return parse_ad(Path(path).read_text(errors="replace"))


def quote(value: Any) -> str:
    """A Python value as a ClassAd literal (for condor_chirp set_job_attr)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def quote_old(text: str) -> str:
    """A string literal in the old ClassAd syntax, which condor_chirp set_job_attr is parsed with
    (seen on HTCondor 23.9): a backslash stands for itself and only `\\"` is an escape, so
    quote() would show every backslash doubled. A newline cannot be carried (one command line)."""
    text = text.replace("\n", " ")
    if text.endswith("\\"):
        text += " "                                  # `\\"` would escape the closing quote
    return '"' + text.replace('"', '\\"') + '"'


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if value is UNDEFINED:
        return "undefined"
    return "an expression"

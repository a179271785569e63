"""Job and machine ads, read and evaluated by HTCondor's own ClassAd library (`classad2`).

The starter hands the job wrapper its ads as old-format `Name = expression` lines
(`.job.ad`, `.machine.ad`). Attributes such as `RequestMemory` are often expressions
(HTCondor's own default is `ifthenelse(MemoryUsage =!= undefined, MemoryUsage,
(ImageSize + 1023) / 1024)`), so values are evaluated the way the starter does: in the
job ad, with the machine ad as TARGET.

Each line is parsed on its own with HTCondor's old-format parser: a line it cannot
parse makes that one attribute unreadable (named in the error), where parsing the whole
file at once silently drops every attribute after the bad line.
"""
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import classad2
from classad2 import ParserType

from .errors import UsageError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class Special:
    """ClassAd's undefined and error values. (classad2 returns them as members of an IntEnum,
    which pass for the numbers 2 and 1 in isinstance checks: we never hand those out.)"""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


UNDEFINED = Special("undefined")
ERROR = Special("error")
_SPECIAL = {classad2.Value.Undefined: UNDEFINED, classad2.Value.Error: ERROR}


class AdError(UsageError):
    """An attribute of an ad cannot be parsed."""

    def __init__(self, message: str, hint: Optional[str] = None, phase: Optional[str] = "job ad"):
        super().__init__(message, hint=hint, phase=phase)


@dataclass(frozen=True)
class Ad:
    """One ad: what HTCondor's parser made of each line, and the lines it could not parse."""
    attrs: classad2.ClassAd
    unparsable: dict = field(default_factory=dict)      # lower-cased name -> the line's value text

    def __contains__(self, name: str) -> bool:
        return name in self.attrs or name.lower() in self.unparsable

    def evaluate(self, name: str, target: Optional["Ad"] = None) -> Any:
        """The attribute's value (a Python value, UNDEFINED or ERROR), evaluated with MY as
        this ad and TARGET as `target`, as the starter evaluates a job's requests."""
        if name.lower() in self.unparsable:
            raise AdError(f"the ad's attribute {name} = {self.unparsable[name.lower()]!r} is not a valid "
                          "ClassAd expression", hint="fix it with condor_qedit and condor_release the job")
        if name not in self.attrs:
            return UNDEFINED
        value = self.attrs.lookup(name).eval(scope=self.attrs, target=target.attrs if target else None)
        return _SPECIAL.get(value, value) if isinstance(value, classad2.Value) else value


def parse_ad(text: str) -> Ad:
    attrs, unparsable = classad2.ClassAd(), {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not _NAME.match(name):
            continue
        one = classad2.parseOne(line, ParserType.Old)
        if len(one) == 0:
            unparsable[name.lower()] = value.strip()
            continue
        unparsable.pop(name.lower(), None)
        attrs.update(one)
    return Ad(attrs, unparsable)


def read_ad(path: Path) -> Ad:
    return parse_ad(Path(path).read_text(errors="replace"))


def declares(text: str, name: str) -> bool:
    """Whether an old-format ad has a line for `name`, without parsing it (so a job that is not
    ours is recognised even where the ClassAd library or the ad itself is broken)."""
    return re.search(rf"^\s*{re.escape(name)}\s*=", text, re.IGNORECASE | re.MULTILINE) is not None


def quote(value: Any) -> str:
    """A Python value as a ClassAd literal (for condor_chirp set_job_attr)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return classad2.quote(str(value))


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
    if value is ERROR:
        return "an error (the expression cannot be evaluated)"
    if isinstance(value, list):
        return "a list"
    return "an expression"

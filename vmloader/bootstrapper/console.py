"""The guest's serial console log: tail it for errors, follow it live with inotify.

The guest writes what it likes to its console. Shown to a user (`run --console`,
`snapshot logs`) it is escaped unless they ask for the raw bytes: lines and tabs
stay, every other control or format character (ESC, a CR inside a line, C1, bidi
overrides, undecodable bytes) becomes a visible escape (see guesttext).
"""
import codecs
import threading
from pathlib import Path
from typing import BinaryIO, Optional

from .guesttext import escape


def tail_bytes(path: Path, lines: int = 30) -> bytes:
    """The last `lines` lines of the console log as the guest wrote them, or b'' when there is none."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read()
    except OSError:
        return b""
    pieces = data.split(b"\n")
    ends_a_line = data.endswith(b"\n")          # then the last piece is the empty rest after it
    return b"\n".join(pieces[-lines - ends_a_line:])


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of the console log, line ends ("\\r\\n" on a serial console) made
    "\\n". Other control characters stay: whoever shows this text escapes it (guesttext)."""
    text = tail_bytes(path, lines).decode("utf-8", "replace")
    return "\n".join(line.rstrip("\r") for line in text.split("\n")).rstrip("\n")


CRASH_MARKS = ("Kernel panic", "Out of memory: Killed process", "BUG: ", "soft lockup", "hung_task")


def crash_line(path: Path) -> Optional[str]:
    """The console line that says why the guest died, if it says so (panic, OOM, BUG)."""
    for line in reversed(tail(path, 200).split("\n")):          # not splitlines: a CR is no line end
        if any(mark in line for mark in CRASH_MARKS):
            return line.strip()
    return None


def failure_tail(path: Path, lines: int = 30, before: int = 5) -> str:
    """What a failed boot's error shows: the last `lines` lines, and when the guest crashed (a
    panic's stack trace fills the tail) also the `before` lines that led to the crash, where the
    guest usually says why (e.g. `run-init: /sbin/init: No such file or directory`)."""
    recent = tail(path, 200).split("\n")
    last = recent[-lines:]
    for index, line in enumerate(recent):
        if any(mark in line for mark in CRASH_MARKS):
            start = max(0, index - before)
            if start >= len(recent) - lines:
                return "\n".join(last)
            gap = ["[...]"] if index + 1 < len(recent) - lines else []
            return "\n".join(recent[start:index + 1] + gap + recent[max(index + 1, len(recent) - lines):])
    return "\n".join(last)


def escape_log(text: str) -> str:
    """A log as a terminal may show it: newlines and tabs kept, the CRs before a newline (a serial
    console's CRLF) dropped, every other control or format character a visible escape."""
    lines = text.split("\n")
    lines = [line.rstrip("\r") for line in lines[:-1]] + lines[-1:]
    return "\n".join("\t".join(escape(part) for part in line.split("\t")) for line in lines)


class LogEscaper:
    """escape_log for bytes arriving in pieces: a UTF-8 character or a CRLF may be split between two."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._held = ""                          # trailing CRs: a line end if a newline follows

    def feed(self, data: bytes, final: bool = False) -> bytes:
        text = self._held + self._decoder.decode(data, final)
        kept = text if final else text.rstrip("\r")
        self._held = text[len(kept):]
        return escape_log(kept).encode("utf-8")


class ConsoleFollower:
    """Copies what the guest prints on its console to `out` as it appears, escaped unless `raw`.

    Watches the log's directory (the log may not exist yet when the job
    starts) for writes with inotify instead of polling the file.
    """

    def __init__(self, path: Path, out: BinaryIO, raw: bool = False):
        self.path = Path(path)
        self.out = out
        self._escaper = None if raw else LogEscaper()
        self._offset = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "ConsoleFollower":
        self._thread = threading.Thread(target=self._run, name="console-follow", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._copy_new(final=True)

    def _run(self) -> None:
        import pyinotify          # (here: only `--console` follows the log; a job's start-up need not load it)
        manager = pyinotify.WatchManager()
        notifier = pyinotify.Notifier(manager, default_proc_fun=lambda event: None, timeout=200)
        mask = pyinotify.IN_MODIFY | pyinotify.IN_CREATE | pyinotify.IN_CLOSE_WRITE
        manager.add_watch(str(self.path.parent), mask)
        try:
            while not self._stop.is_set():
                if notifier.check_events():
                    notifier.read_events()
                    notifier.process_events()
                self._copy_new()
        finally:
            notifier.stop()

    def _copy_new(self, final: bool = False) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return
        self._offset += len(data)
        if self._escaper is not None:
            data = self._escaper.feed(data, final)
        if data:
            self.out.write(data)
            self.out.flush()

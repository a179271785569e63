#!/usr/bin/env python3
"""Run INSIDE a real guest as root by the job itself: it writes hostile text where the host will read it.

`console`: escape sequences, CRs and bidi overrides on the serial console and on stdout, then exit 3
(a failed job: its state, console log and output tails are kept).
`crash`: a console line that looks like a kernel BUG and carries ESC, CR, NUL, bidi and 10 KiB, then
kill the agent, so the host's infrastructure error quotes that line (HoldReason under HTCondor).
Stdlib only.
"""
import os
import sys
import termios
import time

MODE = sys.argv[1]
CONSOLE_LINE = ("guest-text-marker \x1b[2J\x1b[H\x1b]0;owned\x07cleared \x1b[31mred\x1b[0m "
                "progress 10%\rprogress 99% \u202eevil\u202c end\r\n")
CRASH_LINE = ("BUG: guest-text-crash \x1b[2J\x1b[31mred\rover\x00nul \u202eevil\u202c "
              + "A" * 10240 + " tail-end\r\n")


def to_console(text: str) -> None:
    fd = os.open("/dev/ttyS0", os.O_WRONLY | os.O_NOCTTY)
    try:
        data = text.encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
        termios.tcdrain(fd)                       # on the wire (in QEMU) before we go on
    finally:
        os.close(fd)


if MODE == "console":
    to_console(CONSOLE_LINE)
    sys.stdout.write("stdout \x1b[31mred\x1b[0m \x1b]52;c;cGF5bG9hZA==\x07 \u202eevil\u202c\n")
    sys.stdout.flush()
    sys.exit(3)
if MODE == "crash":
    to_console(CRASH_LINE)
    time.sleep(1)                                 # virtlogd writes the log after QEMU hands it the bytes
    os.kill(os.getppid(), 9)                      # the agent: the host's running request is lost
    time.sleep(120)

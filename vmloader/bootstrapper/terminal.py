"""The user's terminal during an interactive guest shell: raw mode while the shell
runs (so Ctrl-C, arrows and line editing reach the guest's tty), the window size
followed, everything restored on the way out."""
import os
import signal
import termios
import threading
import tty
from contextlib import contextmanager
from typing import Callable, Optional, Tuple


def window_size(fd: int) -> Tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
        return size.lines or 24, size.columns or 80
    except OSError:
        return 24, 80


@contextmanager
def raw_mode(fd: Optional[int]):
    """Raw mode on a tty (a pipe or file is left alone); restored even on errors."""
    if fd is None or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextmanager
def following_window_size(fd: int, resize: Callable[[int, int], object]):
    """Call resize(rows, cols) whenever the terminal's window changes (SIGWINCH); what it returns is unused.

    The signal handler only starts a thread: sending may need a lock the
    interrupted main thread holds."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_winch(_signum, _frame):
        threading.Thread(target=lambda: _quietly(resize, *window_size(fd)), daemon=True).start()
    previous = signal.signal(signal.SIGWINCH, on_winch)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)


def _quietly(call, *args) -> None:
    try:
        call(*args)
    except Exception:       # a lost resize must not end the shell
        pass

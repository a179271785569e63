"""What vmloader does on SIGTERM, SIGINT and SIGHUP: condor_rm, preemption and walltime limits
(HTCondor sends SIGTERM, then SIGKILL if the job is slow to go), Ctrl-C, a closed terminal.

The CLI (`install`) turns the first of them into `Interrupted`, raised wherever the main thread
is, so that a job's VM is stopped and its state kept on the way out; later ones are ignored, so
that nothing cuts that short. `Interrupted` is no VMLoaderError: code that tolerates a failure
must not tolerate being stopped (before, a SIGTERM landing in a warm state's build made the job
boot cold and run on). Teardown runs whole: inside `held()` a stop signal is noted and raised
once the block is done. The servers do otherwise (serving.py).
"""
import signal
from contextlib import contextmanager
from typing import Iterator, List

from .errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_held = 0                               # how deep inside held() the main thread is
_noted: List[Interrupted] = []          # a stop signal that came meanwhile


def _on_stop(signum, _frame) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    stop = Interrupted(signum, signal.Signals(signum).name)
    if _held:
        _noted.append(stop)
    else:
        raise stop


def install() -> None:
    """Turn the first stop signal into Interrupted (call from the main thread)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop)


@contextmanager
def held() -> Iterator[None]:
    """A block a stop signal does not cut short (a job's teardown): a signal meanwhile is raised
    as Interrupted when the block ends (if the block raised, its error goes up and the signal
    waits for the end of the next held block: a job's teardown)."""
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1
    if not _held and _noted:
        raise _noted.pop()

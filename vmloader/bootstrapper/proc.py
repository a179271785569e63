"""The one way vmloader runs host programs: argument lists, logged, structured errors."""
import logging
import os
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .errors import CommandError, VMLoaderError


def pid_alive(pid: int) -> bool:
    """A process with this pid exists (possibly another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

log = logging.getLogger(__name__)


def run(argv: Sequence[str], *, check: bool = True, capture: bool = True,
        timeout: Optional[float] = None, hint: Optional[str] = None,
        phase: Optional[str] = None, input: Optional[bytes] = None,
        env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run argv (never through a shell); raise CommandError on failure when check."""
    argv = [str(a) for a in argv]
    log.debug("run: %s", shlex.join(argv))
    try:
        result = subprocess.run(
            argv, input=input, timeout=timeout, env=env,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None)
    except FileNotFoundError:
        raise VMLoaderError(f"program not found: {argv[0]}",
                            hint=hint or "install it (make demo installs what vmloader needs)",
                            phase=phase) from None
    except subprocess.TimeoutExpired:
        raise VMLoaderError(f"{argv[0]} did not finish within {timeout:g} s",
                            hint=hint, phase=phase) from None
    if check and result.returncode != 0:
        stderr = (result.stderr or b"").decode("utf-8", "replace")
        raise CommandError(argv, result.returncode, stderr, hint=hint, phase=phase)
    return result


@dataclass(frozen=True)
class Identity:
    """Who a child runs as: uid and gid, with no supplementary groups."""
    uid: int
    gid: int


def run_bounded(argv: Sequence[str], *, max_output: int, timeout: float, input: bytes = b"",
                as_user: Optional[Identity] = None, cwd: Optional[str] = None,
                env: Optional[dict] = None, phase: Optional[str] = None,
                hint: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run argv whose output we do not trust: stdout is kept up to `max_output` bytes (more kills
    the child and fails), stderr's last 64 KiB are kept, and the whole run is bounded by `timeout`.
    With `as_user`, the child drops to that uid and gid and clears its supplementary groups
    before it starts (after chdir to `cwd`, so it need not be able to reach cwd's parents)."""
    argv = [str(a) for a in argv]
    log.debug("run%s: %s", f" as uid {as_user.uid}" if as_user else "", shlex.join(argv))
    try:
        # user, group and extra_groups of None (Popen's defaults) keep ours.
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 cwd=cwd, env=env, user=as_user.uid if as_user else None,
                                 group=as_user.gid if as_user else None,
                                 extra_groups=[] if as_user else None)
    except FileNotFoundError:
        raise VMLoaderError(f"program not found: {argv[0]}", hint=hint or "install it (scripts/setup-host.sh "
                            "installs what vmloader needs)", phase=phase) from None
    out = _Capped(child.stdout, max_output, on_overflow=child.kill)
    err = _Capped(child.stderr, 64 * 1024, keep_tail=True)
    threads = [threading.Thread(target=_feed, args=(child.stdin, input), daemon=True),
               threading.Thread(target=out.drain, daemon=True), threading.Thread(target=err.drain, daemon=True)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    threads[1].join(timeout)                # stdout's end: the child is (nearly) done, no polling
    try:
        child.wait(timeout=max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise VMLoaderError(f"{argv[0]} did not finish within {timeout:g} s", hint=hint, phase=phase) from None
    finally:
        for thread in threads:
            thread.join(timeout=5)
    if out.overflowed:
        raise VMLoaderError(f"{argv[0]} printed more than {max_output} bytes", hint=hint, phase=phase)
    return subprocess.CompletedProcess(argv, child.returncode, bytes(out.data), bytes(err.data))


def _feed(pipe, data: bytes) -> None:
    try:
        with pipe:
            pipe.write(data)
    except (BrokenPipeError, OSError):
        pass


class _Capped:
    """A pipe read to its end, keeping at most `limit` bytes: the first ones (a child printing more
    is killed), or with keep_tail the last ones."""

    def __init__(self, pipe, limit: int, keep_tail: bool = False,
                 on_overflow: Callable[[], None] = lambda: None):
        self.pipe, self.limit, self.keep_tail, self.on_overflow = pipe, limit, keep_tail, on_overflow
        self.data, self.overflowed = bytearray(), False

    def drain(self) -> None:
        with self.pipe:
            for chunk in iter(lambda: self.pipe.read1(1 << 16), b""):
                self.data += chunk
                if len(self.data) > self.limit:
                    if self.keep_tail:
                        del self.data[:len(self.data) - self.limit]
                    else:
                        self.overflowed = True
                        del self.data[self.limit:]
                        self.on_overflow()
                        return

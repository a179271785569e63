"""The one way vmloader runs host programs: argument lists, logged, structured errors."""
import logging
import shlex
import subprocess
from typing import Optional, Sequence

from .errors import CommandError, VMLoaderError

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

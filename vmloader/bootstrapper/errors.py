"""The exceptions library code raises; only the CLI turns them into exit codes.

Every error carries a user-facing message, a hint saying what to do about it,
and the job phase it happened in, so that an infrastructure failure (exit 125)
is never mistaken for the user's command failing.
"""
from typing import Optional

# docker-run style exit codes for failures that are not the command's own.
EXIT_INFRA = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
EXIT_TIMEOUT = 124


class Reported(BaseException):
    """What the CLI reports as a message, a hint and an exit code: a VMLoaderError, or Interrupted."""

    exit_code = EXIT_INFRA

    def __init__(self, message: str, hint: Optional[str] = None, phase: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.phase = phase

    def user_text(self) -> str:
        lines = []
        prefix = "vmloader: "
        if self.phase:
            prefix += f"[{self.phase}] "
        lines.append(prefix + self.message)
        if self.hint:
            lines.append("hint: " + self.hint)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "message": self.message,
                "hint": self.hint, "phase": self.phase, "exit_code": self.exit_code}


class VMLoaderError(Reported, Exception):
    """Base class: a failure vmloader itself reports (exit 125 by default)."""


class UsageError(VMLoaderError):
    """Bad command-line input or configuration."""


class ConfigError(VMLoaderError):
    """A configuration file or value is malformed."""


class ImageError(VMLoaderError):
    """An image is unknown, missing, or fails verification."""


class ImageBuildError(ImageError):
    """Building a guest image failed."""


class HypervisorError(VMLoaderError):
    """No usable hypervisor, or a forced one is unusable."""


class LibvirtError(VMLoaderError):
    """libvirt refused or failed an operation, or its daemon is unreachable."""


class CgroupError(VMLoaderError):
    """QEMU could not be put into the job's cgroup (it would run uncounted and unlimited)."""


class CommandError(VMLoaderError):
    """A host-side helper program (qemu-img, debootstrap, ...) failed."""

    def __init__(self, argv, returncode: int, stderr: str, hint: Optional[str] = None,
                 phase: Optional[str] = None):
        tail = stderr.strip().splitlines()[-5:]
        message = f"{argv[0]} failed with exit code {returncode}"
        if tail:
            message += ": " + " / ".join(tail)
        super().__init__(message, hint=hint, phase=phase)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


class AgentError(VMLoaderError):
    """The in-guest agent misbehaved, vanished or could not be reached."""


class GuestTimeout(AgentError):
    """The guest did not reach the agent in time."""


class JobCommandNotFound(VMLoaderError):
    exit_code = EXIT_NOT_FOUND


class JobCommandNotExecutable(VMLoaderError):
    exit_code = EXIT_NOT_EXECUTABLE


class SnapshotError(VMLoaderError):
    """A snapshot id is unknown or a snapshot cannot be read or written."""


class Interrupted(Reported):
    """vmloader itself got a termination signal (condor_rm, preemption, walltime, Ctrl-C).

    Not a VMLoaderError (not even an Exception, as KeyboardInterrupt is not): code that tolerates
    a failure (`except VMLoaderError`: a warm state that cannot be used, an output that cannot be
    copied back) must not tolerate being stopped (stopsignals.py)."""

    def __init__(self, signum: int, name: str):
        super().__init__(f"vmloader was stopped by {name}",
                         hint="a running job's VM is stopped and its state kept per --snapshot; HTCondor "
                              "sends SIGTERM on condor_rm, preemption and walltime limits")
        self.exit_code = 128 + signum

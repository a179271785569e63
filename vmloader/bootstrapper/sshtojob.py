"""`condor_ssh_to_job` into a VM job's guest: the ForceCommand side.

HTCondor's starter runs an sshd for `condor_ssh_to_job` as the job's user, with an
sshd_config made from a template (`SSH_TO_JOB_SSHD_CONFIG_TEMPLATE`, shipped in
condor/). Our template's `ForceCommand` runs `vmloader condor ssh-to-job` with the
command HTCondor would have forced (`condor_ssh_to_job_shell_setup <sshd dir>/env.sh`):

* a job that is not a VM job gets exactly that command: ordinary ssh_to_job;
* a VM job's wrapper leaves a pointer (`.vmloader-job`, owner-only) in the sandbox naming
  its job dir; while the command runs, the job dir holds `attach.json` (the guest user,
  work dir, environment and the VM's spare agent ports, written by JobRunner). We attach
  through a free port, with a pty when sshd gave us one, and run the login shell or
  `SSH_ORIGINAL_COMMAND` (also sftp-server for sftp/scp) there.

Everything here runs as the job's user and reads only that user's own files: the pointer,
the job dir and its files must be owned by us (never followed through a symlink). A guest
cannot write the pointer: it is a reserved sandbox name (sandboxnames.RESERVED).
"""
import errno
import json
import os
import stat
import sys
from pathlib import Path
from typing import Mapping, Optional

from . import classad, privatefiles
from .errors import EXIT_INFRA, AgentError, VMLoaderError
from .job import ATTACH_INFO, exit_status
from .orphans import pid_alive
from .sandboxnames import VMLOADER_POINTER
from .sessions import attach_sockets, command_session, shell_session

SETUP_DIR_PREFIX = ".condor_ssh_to_job_"   # HTCondor's sshd dir in the sandbox: <sandbox>/.condor_ssh_to_job_N
STARTING = ("cache lookup", "hypervisor", "overlay", "define", "boot", "stage-in")
ENDING = ("collect", "teardown", "snapshot")
READ_LIMIT = 1 << 20


class SshToJobError(VMLoaderError):
    """condor_ssh_to_job cannot reach the job's VM (not up yet, gone, or not ours)."""

    def __init__(self, message: str, hint: Optional[str] = None, phase: Optional[str] = "ssh-to-job"):
        super().__init__(message, hint=hint, phase=phase)


# -- the wrapper's side ----------------------------------------------------------
def point(sandbox: Path, job_dir: Path) -> None:
    """Tell a later ssh-to-job in this sandbox where the job's VM is (before the VM starts)."""
    privatefiles.write_private(sandbox / VMLOADER_POINTER, str(job_dir) + "\n")


def unpoint(sandbox: Path) -> None:
    try:
        (sandbox / VMLOADER_POINTER).unlink()
    except OSError:
        pass


def is_sshd(argv: list, sandbox: Path) -> bool:
    """Whether the wrapper is asked to run ssh_to_job's sshd: the starter runs it through
    USER_JOB_WRAPPER too (`sshd -i -e -f <sandbox>/.condor_ssh_to_job_N/sshd_config`, from
    SSH_TO_JOB_SSHD_ARGS). It runs on the host as HTCondor means it to, never in a VM. (A job
    of the user's own could start the same: it runs as that user on the host, as any job without
    +VMImage may.)"""
    for arg in argv[1:]:
        path = Path(arg)
        if (path.name == "sshd_config" and path.parent.name.startswith(SETUP_DIR_PREFIX)
                and path.parent.parent == sandbox):
            return True
    return False


# -- the ForceCommand's side -----------------------------------------------------
def sandbox_of(forced: list) -> Optional[Path]:
    """The sandbox, from HTCondor's forced command `<shell_setup> <sandbox>/.condor_ssh_to_job_N/env.sh`."""
    if len(forced) != 2:
        return None
    env_sh = Path(forced[1])
    if not env_sh.is_absolute() or env_sh.name != "env.sh" or not env_sh.parent.name.startswith(SETUP_DIR_PREFIX):
        return None
    return env_sh.parent.parent


def is_vm_job(sandbox: Path) -> bool:
    try:
        text = _read_own(sandbox / ".job.ad", owned=False).decode("utf-8", "replace")
    except (OSError, SshToJobError):
        return False
    return classad.declares(text, "VMImage")


def _read_own(path: Path, owned: bool = True) -> bytes:
    """A regular file's bytes, never through a symlink; with `owned`, only one of our own files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise SshToJobError(f"{path} is a symlink; not followed",
                            hint="ask the worker's admin to look at the job's sandbox") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (owned and st.st_uid != os.geteuid()):
            raise SshToJobError(f"{path} is not a file of this job's user; not trusted",
                                hint="ask the worker's admin to look at the job's sandbox")
        return os.read(fd, READ_LIMIT)
    finally:
        os.close(fd)


def _job_dir(sandbox: Path) -> Optional[Path]:
    """The job dir the pointer names, if the pointer is there and it is one of our private dirs."""
    try:
        text = _read_own(sandbox / VMLOADER_POINTER).decode("utf-8", "replace").strip()
    except FileNotFoundError:
        return None
    path = Path(text)
    try:
        st = os.lstat(path)
    except (OSError, ValueError):
        return None          # named before the runner makes it: still starting
    if (not path.is_absolute() or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid()
            or st.st_mode & 0o022):
        raise SshToJobError(f"the job's pointer names {text!r}, which is not a private directory of this user",
                            hint="ask the worker's admin to look at the job's sandbox")
    return path


def running_vm(sandbox: Path) -> dict:
    """attach.json of the job's running command; SshToJobError saying why there is none."""
    job_dir = _job_dir(sandbox)
    phase = ""
    if job_dir is not None:
        try:
            phase = _read_own(job_dir / "phase").decode("utf-8", "replace").strip()
        except FileNotFoundError:
            pass
    if phase in ENDING:
        raise SshToJobError(f"this job's command has ended and its VM is being torn down ({phase})",
                            hint="its outputs come back with the job; when its state is kept, "
                                 "`vmloader snapshot shell ID` on this worker opens a shell in it")
    info = None
    if phase == "exec":
        try:
            info = json.loads(_read_own(job_dir / ATTACH_INFO))    # type: ignore[operator]
        except FileNotFoundError:
            pass
        except ValueError:
            raise SshToJobError(f"{job_dir}/{ATTACH_INFO} is unreadable",
                                hint="ask the worker's admin to look at the job's record") from None
    if info is None:
        raise SshToJobError(f"this job's VM is still starting ({phase or 'setting up'}); there is no shell in it yet",
                            hint="try again in a minute: condor_ssh_to_job ID (the command starts once "
                                 "the guest has booted and the input files are in)")
    pid = info.get("pid") if isinstance(info, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not pid_alive(pid):
        raise SshToJobError("this job's VM is gone (its vmloader process has ended)",
                            hint="the job is ending; see condor_q -l ID")
    return info


def run(forced: list, environ: Optional[Mapping[str, str]] = None) -> int:
    """The ForceCommand: `forced` is what HTCondor would have run (its shell setup and env.sh)."""
    environ = os.environ if environ is None else environ
    sandbox = sandbox_of(forced)
    if sandbox is None or not is_vm_job(sandbox):
        if not forced:
            print("vmloader condor ssh-to-job: no command given (the sshd_config template's ForceCommand "
                  "must end in _INSERT_FORCE_COMMAND_)", file=sys.stderr)
            return EXIT_INFRA
        os.execv(forced[0], forced)          # not a VM job: condor_ssh_to_job as HTCondor does it
    try:
        info = running_vm(sandbox)
        command = environ.get("SSH_ORIGINAL_COMMAND") or ""
        argv = ["/bin/sh", "-c", command] if command else None
        stdin = sys.stdin.buffer
        session = (shell_session(stdin, argv) if os.isatty(stdin.fileno())
                   else command_session(argv, stdin, None) if argv
                   else shell_session(stdin))
        with attach_sockets(info.get("sockets") or (), dict(info.get("env") or {}), str(info.get("user")),
                            str(info.get("cwd")), str(info.get("job_id", "")), "this job's VM is running",
                            SshToJobError, dead_hint="the job may be ending; try again",
                            busy_hint="close another condor_ssh_to_job session of this job") as attached:
            result = session(attached, sys.stdout.buffer, sys.stderr.buffer)
    except AgentError as exc:
        print(SshToJobError(f"the connection to the job's VM ended: {exc.message}",
                            hint="the job's VM stopped (its command ended or it was removed)").user_text(),
              file=sys.stderr)
        return EXIT_INFRA
    except VMLoaderError as exc:
        print(exc.user_text(), file=sys.stderr)
        return exc.exit_code
    if result.error:
        print(f"vmloader: {result.message}", file=sys.stderr)
    return exit_status(result)

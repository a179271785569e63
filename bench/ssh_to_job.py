#!/usr/bin/env python3
"""Benchmark: time from `condor_ssh_to_job ID` to a shell prompt inside the job's VM.

Starts the test pool (tests/integration/condor_pool.py), runs one long VM job and
one plain job (no +VMImage), waits until the VM job's command runs, then times on a
pty, ROUNDS times each: `condor_ssh_to_job ID` until the guest's prompt appears,
the same for the plain job (HTCondor's own session in the host sandbox: the part
HTCondor itself costs), and `condor_ssh_to_job ID -- true` to its exit. Not a
test: no thresholds, just figures (medians) for the README.
"""
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.condor_pool import USER, start_pool  # noqa: E402

ROUNDS = 5
WORKDIR = f"/home/{USER}/bench-ssh"
VM_JOB = 'executable = /bin/sleep\narguments = 3600\ntransfer_executable = false\nlog = log\n+VMImage = "debian-12"\nqueue\n'
PLAIN_JOB = "executable = /bin/sleep\narguments = 3600\ntransfer_executable = false\nlog = plog\nqueue\n"
# Starts the command on a pty, prints the seconds until marker appears, then leaves the shell.
TIME_TO_PROMPT = r"""
import os, pty, select, sys, time
started = time.monotonic()
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
seen, marker = b"", sys.argv[1].encode()
while marker not in seen and time.monotonic() - started < 300:
    if select.select([fd], [], [], 0.2)[0]:
        try:
            seen += os.read(fd, 4096)
        except OSError:
            break
print("%.3f" % (time.monotonic() - started) if marker in seen else "none %r" % seen[-300:], flush=True)
os.write(fd, b"exit\r")
os.waitpid(pid, 0)
"""


def submit(pool, name: str, text: str) -> str:
    pool.path(f"{WORKDIR}/{name}").write_text(text)
    out = pool.run(["condor_submit", name], cwd=WORKDIR, check=True).stdout
    return re.search(r"submitted to cluster (\d+)", out).group(1) + ".0"


def prompt_seconds(pool, job: str, marker: str) -> float:
    out = pool.run(["python3", "-c", TIME_TO_PROMPT, marker, "condor_ssh_to_job", job], cwd=WORKDIR,
                   timeout=400).stdout.strip()
    if out.startswith("none"):
        raise SystemExit(f"no prompt from condor_ssh_to_job {job}: {out}")
    return float(out.splitlines()[0])


def main() -> None:
    pool = start_pool()
    try:
        pool.run(["mkdir", "-p", WORKDIR], check=True)
        vm_job, plain_job = submit(pool, "vm.sub", VM_JOB), submit(pool, "plain.sub", PLAIN_JOB)
        pool.wait_for(lambda: pool.run(["condor_ssh_to_job", "-auto-retry", vm_job, "--", "true"],
                                       cwd=WORKDIR, timeout=300).returncode == 0, 900, "the VM job's command to run", 3)
        vm, plain, command = [], [], []
        for _ in range(ROUNDS):
            vm.append(prompt_seconds(pool, vm_job, "vmloader@vm-"))
            plain.append(prompt_seconds(pool, plain_job, "$ "))
            started = time.monotonic()
            pool.run(["condor_ssh_to_job", vm_job, "--", "true"], cwd=WORKDIR, check=True, timeout=300)
            command.append(time.monotonic() - started)
        pool.run(["condor_rm", "-all"])
    finally:
        pool.stop()
    med = statistics.median
    print(f"condor_ssh_to_job to a prompt in the VM: median {med(vm):.2f} s (min {min(vm):.2f}, max {max(vm):.2f})")
    print(f"condor_ssh_to_job to a prompt of a plain job (HTCondor alone): median {med(plain):.2f} s")
    print(f"condor_ssh_to_job ID -- true in the VM: median {med(command):.2f} s")


if __name__ == "__main__":
    main()

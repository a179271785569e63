#!/usr/bin/env python3
"""Benchmark: time from `vmloader snapshot shell ID` to a shell prompt, against the
plain boot time (`vmloader run -- true`), and what a memory snapshot costs.

Measured on real boots: (1) `run -- true` end to end; (2) `snapshot shell` on a
disk snapshot, booted afresh on a throwaway overlay, until the prompt appears on
its pty; (3) the same with the snapshot already up (`snapshot boot`: the shell
attaches to a free agent port); (4) a timed-out job's memory save and the resume
of that memory snapshot until `snapshot boot` announces it. Not a test: no
thresholds, just figures (medians of ROUNDS).
"""
import json
import os
import pty
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS = 3
CLI = [sys.executable, "-m", "vmloader.bootstrapper.cli"]


def vmloader(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def time_to_prompt(env, snap: str) -> float:
    started = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [*CLI, "snapshot", "shell", snap], env)
    seen = b""
    while b"$ " not in seen:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            seen += os.read(fd, 4096)
        if time.perf_counter() - started > 300:
            raise SystemExit(f"no prompt: {seen[-500:]!r}")
    elapsed = time.perf_counter() - started
    os.write(fd, b"exit\r")
    while not os.waitpid(pid, os.WNOHANG)[0]:
        try:
            os.read(fd, 4096)
        except OSError:
            pass
        time.sleep(0.05)
    return elapsed


def boot_until_announced(env, snap: str) -> tuple:
    started = time.perf_counter()
    proc = subprocess.Popen([*CLI, "snapshot", "boot", snap, "--json"], env=env, stdout=subprocess.PIPE, text=True)
    info = json.loads(proc.stdout.readline())
    return proc, time.perf_counter() - started, info


def main() -> None:
    state = Path(tempfile.mkdtemp(prefix="vmloader-bench-", dir="/var/tmp"))
    os.chmod(state, 0o711)
    env = dict(os.environ, VMLOADER_STATE_DIR=str(state / "state"))
    plain, fresh, attached, saves, resumes = [], [], [], [], []
    snap = json.loads(vmloader(env, "run", "--image", "debian-12", "--json", "--", "sh", "-c", "exit 1").stdout)["snapshot"]
    for _ in range(ROUNDS):
        started = time.perf_counter()
        vmloader(env, "run", "--image", "debian-12", "--", "true")
        plain.append(time.perf_counter() - started)
        fresh.append(time_to_prompt(env, snap))
        proc, _, _ = boot_until_announced(env, snap)
        attached.append(time_to_prompt(env, snap))
        proc.send_signal(signal.SIGINT)
        proc.wait()
        timed_out = json.loads(vmloader(env, "run", "--image", "debian-12", "--timeout", "5", "--json",
                                        "--", "sleep", "1000").stdout)
        saves.append(timed_out["timings"].get("teardown", 0.0))
        proc, elapsed, _ = boot_until_announced(env, timed_out["snapshot"])
        resumes.append(elapsed)
        proc.send_signal(signal.SIGINT)
        proc.wait()
    print(f"plain boot (run -- true):              {statistics.median(plain):6.2f} s")
    print(f"snapshot shell, fresh boot, to prompt: {statistics.median(fresh):6.2f} s")
    print(f"snapshot shell, attached, to prompt:   {statistics.median(attached):6.2f} s")
    print(f"timeout: teardown incl. memory save:   {statistics.median(saves):6.2f} s")
    print(f"memory snapshot: boot until resumed:   {statistics.median(resumes):6.2f} s")
    subprocess.run(["rm", "-rf", str(state)])


if __name__ == "__main__":
    main()

"""What the HTCondor tests share: submissions and their event logs, and checks of what jobs leave.
(Their `pool` fixture, one real pool per test module, is in conftest.py.)"""
import re
import shutil
from pathlib import Path
from typing import Optional

import htcondor2

from .condor_pool import REPO, USER

EXAMPLES = REPO / "condor" / "examples"
IDLE, RUNNING, REMOVED, COMPLETED, HELD = 1, 2, 3, 4, 5
EVENT_STATUS = {htcondor2.JobEventType.SUBMIT: IDLE, htcondor2.JobEventType.EXECUTE: RUNNING,
                htcondor2.JobEventType.JOB_TERMINATED: COMPLETED, htcondor2.JobEventType.JOB_HELD: HELD,
                htcondor2.JobEventType.JOB_RELEASED: IDLE, htcondor2.JobEventType.JOB_ABORTED: REMOVED}


class Submission:
    def __init__(self, pool, name: str, files: dict):
        self.pool = pool
        self.dir = f"/home/{USER}/{name}"
        host = pool.path(self.dir)
        shutil.rmtree(host, ignore_errors=True)
        host.mkdir(parents=True)
        for rel, source in files.items():
            target = host / rel
            if isinstance(source, Path):
                shutil.copy2(source, target)
            else:
                target.write_bytes(source if isinstance(source, bytes) else source.encode())
        pool.run(["chown", "-R", f"{USER}:", self.dir], user=None, check=True)
        self.cluster = None

    def file(self, rel: str) -> Path:
        return self.pool.path(self.dir) / rel

    def submit(self, subfile: str, *extra) -> int:
        done = self.pool.run(["condor_submit", subfile, *extra], cwd=self.dir, check=True)
        self.cluster = int(re.search(r"submitted to cluster (\d+)", done.stdout).group(1))
        return self.cluster

    def jobs(self) -> dict:
        """proc id -> ad fields, from the queue or, once gone from it, the history."""
        attrs = ["ProcId", "JobStatus", "ExitCode", "HoldReason", "VMLoaderSnapshot", "LastRemoteHost"]
        found = {}
        for tool in (["condor_history", "-match", "100"], ["condor_q", "-allusers"]):
            out = self.pool.run(tool + [str(self.cluster), "-af:t"] + attrs, user=None, timeout=60).stdout
            for line in out.splitlines():
                fields = dict(zip(attrs, line.split("\t")))
                if fields.get("ProcId", "").isdigit():
                    found[int(fields["ProcId"])] = fields
        return found

    def states(self, log: str) -> dict:
        """proc id -> job status, as the job event log tells it."""
        path = self.file(log)
        states = {}
        if not path.exists():
            return states
        with htcondor2.JobEventLog(str(path)) as events:
            for event in events.events(stop_after=0):
                if event.cluster == self.cluster and event.type in EVENT_STATUS:
                    states[event.proc] = EVENT_STATUS[event.type]
        return states

    def wait(self, statuses, count: int = 1, timeout: float = 600, log: Optional[str] = "log") -> dict:
        """Wait on the job event log (without one: on the queue), then read the jobs' ads."""
        def reached(source):
            done = [s for s in source().values() if int(s) in statuses]
            return len(done) >= count
        what = f"cluster {self.cluster} to reach status {statuses}"
        if log is not None:
            self.pool.wait_for(lambda: reached(lambda: self.states(log)), timeout, what + " in its event log", 1)
            timeout = 60
        return self.pool.wait_for(lambda: reached(lambda: {p: j["JobStatus"] for p, j in self.jobs().items()})
                                  and self.jobs(), timeout, what + " in the queue or history", 1)


def fields(text: str) -> dict:
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


WARM_ADVERTISED = 'condor_status -constraint \'VMLoaderCacheDir == "/var/cache/vmloader-{}"\' -af VMLoaderWarmImages'


def kept_warm_on_vm2(pool) -> None:
    """debian-12 fetched into vm2's cache through its cache service, as a job's first use does; the
    service (keep_warm = debian-12 there, nothing on vm1) then builds root's state of it, and vm2's
    probe advertises it. Waits for that (a boot and a save under TCG: minutes on a loaded host)."""
    pool.vmloader("images", "pull", "debian-12", cache="/var/cache/vmloader-2", check=True, timeout=600)
    pool.wait_for(lambda: "debian-12" in pool.run(["sh", "-c", WARM_ADVERTISED.format(2)], user=None).stdout,
                  1200, "vm2's cache service to build debian-12's warm state and its probe to advertise it")


def held_true_job(pool, name: str, lines: str) -> tuple:
    """Submit `/bin/true` as a debian-12 VM job with these extra submit lines; wait until it is held."""
    job = Submission(pool, name, {"job.sub": (
        "executable = /bin/true\ntransfer_executable = false\nshould_transfer_files = YES\nlog = log\n"
        f'+VMImage = "debian-12"\n{lines}queue\n')})
    job.submit("job.sub")
    return job, job.wait({HELD})[0]["HoldReason"]


def ssh_to_job(pool, job, *args, timeout: float = 300):
    return pool.run(["condor_ssh_to_job", *args], cwd=job.dir, timeout=timeout)


def job_user_leftovers(pool) -> dict:
    """What a VM job of USER may leave on a worker once no job of it runs: its processes (a libvirt
    session daemon, QEMU), its private libvirt runtime dirs (/tmp/vml-*, the daemons' sockets)."""
    uid = pool.run(["id", "-u", USER], user=None, check=True).stdout.strip()
    procs = []
    for pid, cmdline in pool.command_lines().items():
        try:
            if str(Path(f"/proc/{pid}").stat().st_uid) == uid:
                procs.append(cmdline)
        except OSError:                  # ended while we looked
            pass
    return {"processes": procs, "runtime dirs": sorted(p.name for p in pool.path("/tmp").glob("vml-*"))}


def wait_for_no_leftovers(pool, timeout: float = 120) -> None:
    last = {}

    def gone():
        last.update(job_user_leftovers(pool))
        return last == {"processes": [], "runtime dirs": []}
    try:
        pool.wait_for(gone, timeout, "the job user's processes and runtime dirs to be gone")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; left: {last}") from None

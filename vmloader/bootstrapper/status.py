"""`vmloader status`: the job VMs running on this worker, as vNode showed its VM table."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

from .orphans import pid_alive

if TYPE_CHECKING:
    import psutil             # (imported by `vmloader status` alone: the CLI's other commands start faster)


@dataclass(frozen=True)
class RunningJob:
    job_id: str
    image: str
    user: str
    uptime_s: float
    phase: str
    vmloader_pid: int
    qemu_pid: Optional[int]
    cpu_percent: Optional[float]
    rss_bytes: Optional[int]
    console_log: str

    def to_dict(self) -> dict:
        return asdict(self)


def _qemu_process(domain: str) -> Optional[psutil.Process]:
    import psutil
    marker = f"guest={domain}"
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in arg for arg in (proc.info["cmdline"] or [])):
            return proc
    return None


def running_jobs(jobs_dir: Path, user: str) -> List[RunningJob]:
    found: List[RunningJob] = []
    if not jobs_dir.is_dir():
        return found
    for job_dir in sorted(jobs_dir.iterdir()):
        owner_file = job_dir / "owner.json"
        if not owner_file.exists() or (job_dir / "metadata.json").exists():
            continue
        owner = json.loads(owner_file.read_text())
        if not pid_alive(owner["pid"]):
            continue                   # an orphan: `vmloader cleanup` deals with it
        found.append(_describe(job_dir, owner, user))
    return found


def _describe(job_dir: Path, owner: dict, user: str) -> RunningJob:
    import psutil
    qemu = _qemu_process(owner.get("domain") or f"vmloader-{job_dir.name}")
    cpu = rss = None
    if qemu is not None:
        try:
            cpu, rss = qemu.cpu_percent(interval=0.2), qemu.memory_info().rss
        except psutil.Error:
            qemu = None
    phase_file = job_dir / "phase"
    return RunningJob(
        job_id=job_dir.name, image=owner.get("image", ""), user=user,
        uptime_s=round(time.time() - owner.get("started", time.time()), 1),
        phase=phase_file.read_text().strip() if phase_file.exists() else "starting",
        vmloader_pid=owner["pid"], qemu_pid=qemu.pid if qemu else None, cpu_percent=cpu, rss_bytes=rss,
        console_log=str(job_dir / "console.log"))

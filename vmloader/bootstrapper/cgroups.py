"""The memory limit of the cgroup this process runs in (an HTCondor job's, under cgroup limits).

The job's VM (QEMU, started by the job's private libvirt session daemon, a descendant of the
job) is in that cgroup too: a guest sized past the limit would be OOM-killed by the kernel. The
wrapper sizes the guest within it, as within the slot's Memory.
"""
from pathlib import Path
from typing import Optional

UNLIMITED_V1 = 2 ** 62          # cgroup v1 says "no limit" with a number near 2**63


def memory_limit_bytes(proc_cgroup: Path = Path("/proc/self/cgroup"),
                       mount: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """The limit on this process's memory cgroup (v1 `memory.limit_in_bytes`, v2 `memory.max`);
    None when there is none or it cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if "memory" in controllers.split(","):
            return _read_limit(mount / controllers / path.lstrip("/") / "memory.limit_in_bytes")
    for line in lines:
        if line.startswith("0::"):
            return _read_limit(mount / line[3:].lstrip("/") / "memory.max")
    return None


def _read_limit(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():              # v2's "max"
        return None
    value = int(text)
    return value if 0 < value < UNLIMITED_V1 else None

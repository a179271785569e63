"""The memory limit of the cgroup this process runs in (an HTCondor job's, under cgroup limits).

The job's VM (QEMU, started by the job's private libvirt session daemon, a descendant of the
job) is in that cgroup too: a guest sized past the limit would be OOM-killed by the kernel. The
wrapper sizes the guest within it, as within the slot's Memory.
"""
from pathlib import Path
from typing import Optional, Tuple

UNLIMITED_V1 = 2 ** 62          # cgroup v1 says "no limit" with a number near 2**63


def _memory_cgroup(proc_cgroup: Path, mount: Path) -> Optional[Tuple[int, Path]]:
    """(1, dir) of this process's v1 memory cgroup, or (2, dir) of its v2 cgroup; None if neither."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if "memory" in controllers.split(","):
            return 1, mount / controllers / path.lstrip("/")
    for line in lines:
        if line.startswith("0::"):
            return 2, mount / line[3:].lstrip("/")
    return None


def memory_limit_bytes(proc_cgroup: Path = Path("/proc/self/cgroup"),
                       mount: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """The memory limit that applies to this process's cgroup, its ancestors' included (v1:
    `hierarchical_memory_limit` in memory.stat, else `memory.limit_in_bytes`; v2: the smallest
    `memory.max` up the tree); None when there is none or it cannot be read."""
    found = _memory_cgroup(proc_cgroup, mount)
    if found is None:
        return None
    version, leaf = found
    if version == 1:
        hierarchical = _counter(leaf / "memory.stat", "hierarchical_memory_limit")
        if hierarchical is not None:
            return hierarchical if 0 < hierarchical < UNLIMITED_V1 else None
        return _read_limit(leaf / "memory.limit_in_bytes")
    parts = leaf.relative_to(mount).parts
    limits = [_read_limit(mount.joinpath(*parts[:n]) / "memory.max") for n in range(1, len(parts) + 1)]
    return min((limit for limit in limits if limit is not None), default=None)


def _read_limit(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():              # v2's "max"
        return None
    value = int(text)
    return value if 0 < value < UNLIMITED_V1 else None


def oom_kills(proc_cgroup: Path = Path("/proc/self/cgroup"), mount: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """How many processes the kernel's OOM killer ended in this process's memory cgroup (v1
    `memory.oom_control`, v2 `memory.events`: `oom_kill N`); None when it cannot tell."""
    found = _memory_cgroup(proc_cgroup, mount)
    if found is None:
        return None
    version, leaf = found
    return _counter(leaf / ("memory.oom_control" if version == 1 else "memory.events"), "oom_kill")


def _counter(path: Path, name: str) -> Optional[int]:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return None


def oom_note(before: Optional[int]) -> Optional[str]:
    """What to say when the VM vanished and the job's memory cgroup counted a new OOM kill since `before`."""
    after = oom_kills()
    if before is None or after is None or after <= before:
        return None
    limit = memory_limit_bytes()
    at = f" of {limit // 2 ** 20} MiB" if limit else ""
    return (f"; the kernel's OOM killer ended QEMU at the job's memory limit{at} (its cgroup): the VM "
            "and QEMU's own memory did not fit")

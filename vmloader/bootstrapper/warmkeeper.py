"""Root's cache service keeps warm states ready in the shared cache (`keep_warm`).

HTCondor jobs restore root's warm states and never build one (it would be saved inside their
slot, charged to their cgroup, for that user alone): without a builder of root's, a worker's
jobs boot cold until an admin runs `vmloader images warm`. The cache service is root's already
and outside every slot, so it keeps them: for each cached image that `keep_warm` names (or every
one, with "*"), `warm_lanes` lanes (0: one per host CPU, as a worker has one slot per CPU) of its
default shape, the one the probe advertises as VMLoaderWarmImages and jobs get unless they ask
for another size. It looks when it starts, after each image it fetches for a job, and every
RECHECK seconds (an eviction, or a QEMU or vmloader upgrade that makes states stale, shows there),
and builds what is missing one image at a time with `vmloader images warm NAME --lanes N`, in a
process of its own (a build's failure or hang is never the service's). A failed build is tried
again after RETRY_AFTER seconds, not at every look. Nothing a user sends chooses what is built:
the images are those root cached, the shape each image's default.
"""
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from . import warm
from .errors import VMLoaderError

RECHECK = 300.0          # seconds between looks at what the cache holds
RETRY_AFTER = 3600.0     # seconds before a failed build of the same image is tried again
ALL = "*"


@dataclass(frozen=True)
class Want:
    """An image whose default shape has fewer complete lanes than wanted."""
    name: str
    disk_sha256: str
    lanes: int
    have: int


def lanes_wanted(cfg) -> int:
    return cfg.warm_lanes or os.cpu_count() or 1


def wanted(cfg, entries: dict, lanes_of: Callable[[dict], Dict[str, int]]) -> List[Want]:
    """Of the cached `entries` ({name: entry}), those keep_warm names that lack lanes (an image
    known by two names once; UEFI images never: their jobs boot cold)."""
    if not cfg.warm_start or not cfg.keep_warm:
        return []
    chosen: Dict[str, str] = {}                     # disk sha256 -> the name it is built under
    for name, entry in sorted(entries.items()):
        disk = entry.artifacts.get("disk")
        if ((ALL in cfg.keep_warm or name in cfg.keep_warm) and disk is not None
                and entry.firmware != "uefi" and disk.sha256 not in chosen):
            chosen[disk.sha256] = name
    if not chosen:
        return []
    lanes = lanes_wanted(cfg)
    have = lanes_of({name: entries[name] for name in chosen.values()})
    return [Want(name, sha, lanes, have.get(name, 0)) for sha, name in chosen.items() if have.get(name, 0) < lanes]


def build_with_cli(name: str, lanes: int) -> bool:
    """`vmloader images warm NAME --lanes N` as this process's user (root), its output in our log."""
    argv = [sys.executable, "-m", "vmloader.bootstrapper.cli", "images", "warm", name, "--lanes", str(lanes)]
    try:
        out = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        out = subprocess.DEVNULL
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out).returncode == 0


class WarmKeeper:
    """Builds the missing lanes of the images `keep_warm` names, one image at a time (see above)."""

    def __init__(self, cfg, entries: Callable[[], dict], log: Callable[[str], None],
                 build: Callable[[str, int], bool] = build_with_cli,
                 lanes_of: Optional[Callable[[dict], Dict[str, int]]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg, self.entries, self.log, self.build, self.clock = cfg, entries, log, build, clock
        self.lanes_of = lanes_of or (lambda found: warm.shared_warm_lanes(cfg, found))
        self.failed: Dict[str, float] = {}          # disk sha256 -> when its build last failed
        self._wake = threading.Event()

    def wake(self) -> None:
        """Look again now (the service fetched an image)."""
        self._wake.set()

    def run_once(self) -> List[str]:
        """Build what is missing; the names of the images it tried."""
        try:
            missing = wanted(self.cfg, self.entries(), self.lanes_of)
        except (VMLoaderError, OSError) as exc:
            self.log(f"keep warm: cannot read the cache: {getattr(exc, 'message', exc)}")
            return []
        tried = []
        for want in missing:
            failed_at = self.failed.get(want.disk_sha256)
            if failed_at is not None and self.clock() - failed_at < RETRY_AFTER:
                continue
            self.log(f"keep warm: {want.name} has {want.have} of {want.lanes} lane(s) of its default shape; "
                     "building them")
            started = self.clock()
            ok = self.build(want.name, want.lanes)
            tried.append(want.name)
            if ok:
                self.failed.pop(want.disk_sha256, None)
                self.log(f"keep warm: {want.name}: {want.lanes} lane(s) ready ({self.clock() - started:.0f} s)")
            else:
                self.failed[want.disk_sha256] = self.clock()
                self.log(f"keep warm: {want.name}: the build failed (see above); trying again in "
                         f"{RETRY_AFTER / 60:.0f} min; its jobs boot cold meanwhile")
        return tried

    def serve_forever(self) -> None:
        while True:
            self._wake.clear()
            try:
                self.run_once()
            except Exception:                       # a bug must not end the keeping, nor the service
                self.log(f"keep warm: internal error:\n{traceback.format_exc()}")
            self._wake.wait(RECHECK)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="keep-warm", daemon=True)
        thread.start()
        return thread

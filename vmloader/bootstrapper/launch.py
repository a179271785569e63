"""What a job brings to life, decided before anything starts: a launch plan.

- our image, booted cold (`vmloader run`);
- a kept disk: a snapshot's overlay booted again (`snapshot exec/shell/boot`);
- a kept memory state: a timed-out job's VM resumed where it was saved;
- a warm state: our image booted once and saved at agent-ready, restored (warm.py).

Each plan says which disks make the chain under the job's throwaway overlay, what the
VM is called, and how it starts (define and create, or restore of saved memory).
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

from . import privatefiles
from .domain import DomainSpec, domain_xml, retarget_saved_xml
from .errors import VMLoaderError
from .snapshots import Snapshot, SnapshotStore
from .virt import Machine, Machines
from .warm import Lane, WarmUnusable

COLD_IMAGE = "cold image"
KEPT_DISK = "kept disk"
KEPT_MEMORY = "kept memory"
WARM_STATE = "warm state"


@dataclass(frozen=True)
class LaunchPlan:
    kind: str                              # COLD_IMAGE, KEPT_DISK or KEPT_MEMORY
    image_ref: str                         # the image at the bottom of the disk chain
    kept: Optional[Snapshot] = None        # the snapshot brought back (kept disk or memory)
    lane: Optional[Lane] = None            # the warm state restored (its lock held by the job)

    @property
    def restores_memory(self) -> bool:
        return self.kind in (KEPT_MEMORY, WARM_STATE)

    @property
    def warm(self) -> bool:
        return self.kind == WARM_STATE

    def overlay_backing(self, image_disk: Path) -> Path:
        """What the job's throwaway overlay is created on."""
        if self.lane is not None:
            return self.lane.disk
        return self.kept.disk if self.kept is not None else image_disk

    def middle_layers(self) -> tuple:
        """Disks between the image and the overlay, for the domain XML's backing chain."""
        if self.lane is not None:
            return (str(self.lane.disk),)
        return (str(self.kept.disk),) if self.kept is not None else ()

    def domain_name(self, job_dir: Path) -> str:
        if self.lane is not None:             # restored under the name (and uuid) it was saved with
            return self.lane.domain_name
        # A resumed memory snapshot keeps the name it was saved under (libvirt insists).
        if self.kept is not None and self.restores_memory:
            return f"vmloader-{self.kept.meta.id}"
        return f"vmloader-{job_dir.name}"


def cold_image(ref: str) -> LaunchPlan:
    return LaunchPlan(COLD_IMAGE, ref)


def kept_state(snapshot: Snapshot, stderr: Optional[TextIO] = None) -> LaunchPlan:
    """A snapshot: resumed from its memory when it has one, else its disk booted."""
    if snapshot.meta.memory:
        if snapshot.memory_state.exists():
            return LaunchPlan(KEPT_MEMORY, snapshot.meta.image, snapshot)
        print(f"vmloader: snapshot {snapshot.meta.id} has lost its memory state; booting its disk state",
              file=stderr or sys.stderr)
    return LaunchPlan(KEPT_DISK, snapshot.meta.image, snapshot)


def warm_state(image_ref: str, lane: Lane) -> LaunchPlan:
    return LaunchPlan(WARM_STATE, image_ref, lane=lane)


def plan_for(image_ref: str, from_snapshot: Optional[str], store: SnapshotStore) -> LaunchPlan:
    """The plan for a job: its image (a URL already resolved to a cache ref), or a kept state."""
    if from_snapshot:
        return kept_state(store.get(from_snapshot))
    return cold_image(image_ref)


def start(plan: LaunchPlan, machines: Machines, spec: DomainSpec, xml_file: Path) -> Machine:
    """Bring the plan's VM to life; the XML used is written to `xml_file` for the job record."""
    if plan.lane is not None:
        return _restore_warm(plan.lane, machines, spec, xml_file)
    if plan.kept is not None and plan.restores_memory:
        return _restore(plan.kept, machines, spec, xml_file)
    xml = domain_xml(spec)
    privatefiles.write_private(xml_file, xml)
    return machines.create(xml)


def _restore(kept: Snapshot, machines: Machines, spec: DomainSpec, xml_file: Path) -> Machine:
    """Start a memory snapshot where it stopped: same guest hardware, new host-side files."""
    state = kept.memory_state
    try:
        xml = retarget_saved_xml(machines.saved_xml(state), spec)
        privatefiles.write_private(xml_file, xml)
        return machines.restore(state, xml, spec.name)
    except VMLoaderError as err:
        err.message = f"cannot resume snapshot {kept.meta.id} from its memory state {state}: {err.message}"
        err.hint = (f"the memory state may be damaged or saved by another QEMU/libvirt version; to boot "
                    f"the kept disk alone, move {state} out of the way")
        raise


def _restore_warm(lane: Lane, machines: Machines, spec: DomainSpec, xml_file: Path) -> Machine:
    """Restore a warm state onto the job's files; WarmUnusable if libvirt cannot."""
    try:
        xml = retarget_saved_xml(machines.saved_xml(lane.memory), spec, foreign=lane.borrowed)
        privatefiles.write_private(xml_file, xml)
        return machines.restore(lane.memory, xml, spec.name)
    except WarmUnusable:
        raise
    except VMLoaderError as err:
        raise WarmUnusable(f"restoring it failed: {err.message}", phase="restore") from None

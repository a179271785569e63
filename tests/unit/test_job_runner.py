"""JobRunner against a fake machine (tests/unit/fakemachine.py): no VM, no libvirt.

The agent is real and runs commands on this host; disks are real qcow2 files
(qemu-img), the image cache is a stand-in that resolves one image.
"""
import dataclasses
import io
import json
import os
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from contextlib import nullcontext
from pathlib import Path

import pytest

from vmloader.bootstrapper import launch
from vmloader.bootstrapper.cache import ResolvedImage
from vmloader.bootstrapper.catalog import Artifact, ImageEntry
from vmloader.bootstrapper.config import Config
from vmloader.bootstrapper.deliverymemory import DELIVERIES_DIR, DeliveryMemory
from vmloader.bootstrapper.errors import EXIT_INFRA, EXIT_NOT_FOUND, EXIT_TIMEOUT
from vmloader.bootstrapper.hypervisors import Hypervisor
from vmloader.bootstrapper.job import JobRunner, JobSpec
from vmloader.bootstrapper.snapshots import SnapshotStore

from fakemachine import FakeMachines   # tests/unit is on sys.path (no package)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")

QEMU = Hypervisor("qemu", True, "fake", "test:///fake", "qemu")


class OneImageCache:
    """Resolves every reference to one image; pins are no-ops."""

    def __init__(self, root: Path):
        disk = root / "base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
        for name in ("vmlinuz", "initrd.img"):
            (root / name).write_bytes(b"fake")
        artifacts = {kind: Artifact(f"file:///{kind}", kind[0] * 64, 4) for kind in ("disk", "kernel", "initrd")}
        self.image = ResolvedImage(ImageEntry("fake", "1", artifacts=artifacts),
                                   {"disk": disk, "kernel": root / "vmlinuz", "initrd": root / "initrd.img"})

    def resolve(self, ref: str) -> ResolvedImage:
        return self.image

    def pin(self, image):
        return nullcontext()

    def has_all(self, entry) -> bool:
        return True


@pytest.fixture
def world():
    # A short path: the agent's unix socket lives in the job dir (108 bytes at most).
    root = Path(tempfile.mkdtemp(prefix="vjr", dir="/tmp"))
    os.chmod(root, 0o711)           # as root, the runner checks QEMU could reach the job dir
    yield root
    shutil.rmtree(root, ignore_errors=True)


class Rig:
    def __init__(self, root: Path, boot_timeout: int = 15, warm_start: bool = False, warm_lanes: int = 0,
                 libvirt_uri=None, qemu_cgroup: str = "libvirt", host_cgroups=None, **fake_options):
        self.root = root
        (root / "work").mkdir(exist_ok=True)
        self.config = Config(cache_dir=root / "cache", state_dir=root / "state", boot_timeout=boot_timeout,
                             warm_start=warm_start, warm_lanes=warm_lanes, libvirt_uri=libvirt_uri,
                             qemu_cgroup=qemu_cgroup)
        self.host_cgroups = host_cgroups
        self.cache = OneImageCache(root)
        self.store = SnapshotStore(self.config.snapshots_dir)
        self.fake = FakeMachines(root / "work", **fake_options)
        self.out, self.err = io.BytesIO(), io.BytesIO()

    def run(self, *command, **spec_fields):
        runner = JobRunner(self.config, self.cache, self.store, lambda: QEMU, stdout=self.out,
                           stderr=self.err, connect=self.fake, host_cgroups=self.host_cgroups)
        return runner.run(JobSpec(image="fake", command=tuple(command), **spec_fields))

    def job_file(self, result, name: str) -> str:
        return (Path(result.job_dir) / name).read_text()


def torn_down(fake: FakeMachines) -> bool:
    """Every machine stopped (destroyed, killed or saved) and the connection closed, in that order."""
    kinds = fake.kinds()
    return (all(not m.is_active() for m in fake.machines) and kinds[-1] == "close"
            and any(k in ("destroy", "kill", "save") for k in kinds))


def test_a_cold_job_runs_its_command_and_tears_down(world):
    rig = Rig(world)
    result = rig.run("sh", "-c", "echo hello from $VMLOADER_IMAGE; pwd", snapshot="never")
    assert result.exit_status == 0, result.error
    assert rig.out.getvalue().decode().splitlines() == ["hello from fake@1", str(world / "work")]
    # (the agent may power off before the runner kills the VM: both are fine)
    assert [k for k in rig.fake.kinds() if k != "poweroff"] == ["connect", "create", "identity", "kill", "close"]
    assert rig.fake.events[1] == ("create", f"vmloader-{result.job_id}")
    assert result.snapshot is None and not Path(result.job_dir, "overlay.qcow2").exists()


def test_a_boot_that_never_reaches_the_agent_shows_the_console_tail_and_tears_down(world):
    rig = Rig(world, boot_timeout=2, boot_answers=False,
              console_text="Loading kernel\nKernel panic - not syncing: VFS: unable to mount root fs\n")
    result = rig.run("true")
    assert result.exit_status == EXIT_INFRA and result.error["phase"] == "boot"
    assert "never reached the agent" in result.error["message"]
    assert "Kernel panic - not syncing" in result.error["message"]
    assert torn_down(rig.fake)
    assert result.snapshot is None                  # the command never ran: nothing worth keeping


def test_a_command_that_cannot_start_still_tears_down(world):
    rig = Rig(world)
    result = rig.run("definitely-not-a-command", snapshot="never")
    assert result.exit_status == EXIT_NOT_FOUND and result.error["phase"] == "exec"
    assert torn_down(rig.fake)


def test_teardown_runs_when_collecting_outputs_fails(world):
    rig = Rig(world)
    not_a_dir = world / "file"
    not_a_dir.write_text("")
    with pytest.raises(OSError):
        rig.run("sh", "-c", "echo data > result.txt", outputs=("result.txt",), output_dir=not_a_dir,
                snapshot="never")
    assert torn_down(rig.fake)


@pytest.mark.parametrize("policy, command, kept", [
    ("never", "exit 3", False), ("on-failure", "exit 0", False), ("on-failure", "exit 3", True),
    ("always", "exit 0", True)])
def test_the_disk_state_is_kept_or_dropped_per_policy(world, policy, command, kept):
    rig = Rig(world)
    result = rig.run("sh", "-c", command, snapshot=policy)
    assert (result.snapshot is not None) == kept
    assert not Path(result.job_dir, "overlay.qcow2").exists()          # moved into the store or deleted
    if kept:
        snap = rig.store.get(result.snapshot)
        assert snap.disk.is_file() and not snap.meta.memory


def test_a_timeout_whose_state_is_kept_saves_the_memory_and_resumes_from_it(world):
    rig = Rig(world)
    result = rig.run("sh", "-c", "echo started; sleep 60", timeout=1.5, snapshot="on-failure")
    assert result.exit_status == EXIT_TIMEOUT
    assert "save" in rig.fake.kinds() and "destroy" in rig.fake.kinds() and torn_down(rig.fake)
    snap = rig.store.get(result.snapshot)
    assert snap.meta.memory and snap.memory_state.is_file()
    plan = launch.plan_for("fake", snap.meta.id, rig.store)
    assert plan.kind == launch.KEPT_MEMORY and plan.domain_name(world) == f"vmloader-{snap.meta.id}"
    again = rig.run("echo", "resumed", snapshot="never", from_snapshot=snap.meta.id)
    assert again.exit_status == 0, again.error
    assert ("restore", f"vmloader-{snap.meta.id}") in rig.fake.events
    owner = json.loads(rig.job_file(again, "owner.json"))
    assert owner["domain"] == f"vmloader-{snap.meta.id}"      # orphan cleanup finds it by its saved name


def test_a_timeout_without_a_kept_state_is_destroyed_not_saved(world):
    rig = Rig(world)
    result = rig.run("sleep", "60", timeout=1.0, snapshot="never")
    assert result.exit_status == EXIT_TIMEOUT and result.snapshot is None
    assert "save" not in rig.fake.kinds() and torn_down(rig.fake)


@pytest.mark.parametrize("policy, command, stop", [
    ("never", "exit 3", "kill"), ("on-failure", "exit 0", "kill"), ("on-failure", "exit 3", "destroy"),
    ("always", "exit 0", "destroy")])
def test_a_vm_nothing_is_kept_of_is_killed_and_a_kept_one_destroyed_after_the_sync(world, policy, command, stop):
    rig = Rig(world)
    rig.run("sh", "-c", command, snapshot=policy)
    stops = [k for k in rig.fake.kinds() if k in ("kill", "destroy")]
    assert stops == [stop] and torn_down(rig.fake)
    assert ("shutdown" in rig.fake.kinds()) == (stop == "destroy")


def test_a_failed_memory_save_keeps_the_disk_state_only(world):
    rig = Rig(world, save_fails=True)
    result = rig.run("sleep", "60", timeout=1.0, snapshot="on-failure")
    assert result.exit_status == EXIT_TIMEOUT and torn_down(rig.fake)
    assert rig.fake.kinds()[-2:] == ["destroy", "close"]
    assert not rig.store.get(result.snapshot).meta.memory


def test_a_kept_disk_boots_again_on_a_throwaway_overlay(world):
    rig = Rig(world)
    first = rig.run("sh", "-c", "echo kept > marker; exit 3", snapshot="on-failure")
    snap = rig.store.get(first.snapshot)
    assert launch.plan_for("fake", snap.meta.id, rig.store).kind == launch.KEPT_DISK
    again = rig.run("true", snapshot="never", from_snapshot=snap.meta.id)
    assert again.exit_status == 0, again.error
    assert rig.fake.events.count(("create", f"vmloader-{again.job_id}")) == 1
    assert str(snap.disk) in rig.job_file(again, "domain.xml")           # the kept layer is in the chain
    assert rig.store.get(snap.meta.id).disk.is_file()                    # the snapshot is only read


def test_a_snapshot_that_lost_its_memory_state_boots_its_disk(world, capsys):
    rig = Rig(world)
    first = rig.run("sleep", "60", timeout=1.0, snapshot="on-failure")
    snap = rig.store.get(first.snapshot)
    snap.memory_state.unlink()
    plan = launch.plan_for("fake", snap.meta.id, rig.store)
    assert plan.kind == launch.KEPT_DISK and "lost its memory state" in capsys.readouterr().err


def test_the_plan_for_each_entry_point(world):
    """`run` brings the image to life; `snapshot exec/shell/boot` pass from_snapshot."""
    rig = Rig(world)
    cold = launch.plan_for("fake@1", None, rig.store)
    assert (cold.kind, cold.image_ref, cold.middle_layers()) == (launch.COLD_IMAGE, "fake@1", ())
    assert cold.overlay_backing(Path("/base")) == Path("/base")
    kept = rig.run("false", snapshot="always")
    plan = launch.plan_for("ignored", kept.snapshot, rig.store)
    snap = rig.store.get(kept.snapshot)
    assert (plan.kind, plan.image_ref) == (launch.KEPT_DISK, snap.meta.image)
    assert plan.overlay_backing(Path("/base")) == snap.disk and plan.middle_layers() == (str(snap.disk),)
    assert plan.domain_name(Path("/jobs/J")) == "vmloader-J"


def test_the_translation_cache_is_the_configs_unless_the_job_names_one(world):
    """A TCG VM's translation cache: the config's tcg_tb_cache_mib (a heavy guest translates less
    again with more), or what the job says (an HTCondor slot's bound, which its overhead counts)."""
    from vmloader.bootstrapper import domain
    rig = Rig(world)
    assert rig.config.tcg_tb_cache_mib == domain.TCG_TB_CACHE_MIB == 256
    rig.config = dataclasses.replace(rig.config, tcg_tb_cache_mib=300)
    configured = rig.run("true", snapshot="always")
    in_slot = rig.run("true", snapshot="always", tb_cache_mib=domain.SLOT_TB_CACHE_MIB)
    for result, mib in ((configured, "300"), (in_slot, "64")):
        tb = ET.fromstring(rig.job_file(result, "domain.xml")).find("features/tcg/tb-cache")
        assert (tb.text, tb.get("unit")) == (mib, "MiB"), result.error


def test_one_function_wires_a_runner_from_the_config(world):
    from vmloader.bootstrapper import runners, virt
    config = Config(cache_dir=world / "cache", state_dir=world / "state")
    fake = FakeMachines(world)
    runner = runners.job_runner(config, connect=fake)
    assert runner.cache.root == config.cache_dir and runner.store.root == config.snapshots_dir
    assert runner.connect is fake
    assert runners.job_runner(config).connect is virt.LibvirtMachines


def test_a_job_writing_past_its_disk_limit_is_paused_and_fails_naming_the_limit(world):
    """The command grows the overlay (as a guest's writes do) and would then sleep for a minute:
    the VM is paused at the limit and the job ends at once with exit 125, not a guest crash."""
    from vmloader.bootstrapper.disklimit import MIB, DiskLimit
    rig = Rig(world)
    grow = (f"head -c {4 * MIB} /dev/urandom >> {world}/state/jobs/$VMLOADER_JOB_ID/overlay.qcow2; "
            "echo grown; sleep 60")
    result = rig.run("sh", "-c", grow, snapshot="never", disk_limit=DiskLimit(2 * MIB, "request_disk test"))
    assert result.exit_status == EXIT_INFRA, result.error
    assert "disk limit" in result.error["message"] and "2 MiB allowed (request_disk test)" in result.error["message"]
    assert result.error["phase"] == "exec" and "request_disk" in result.error["hint"]
    assert "pause" in rig.fake.kinds() and torn_down(rig.fake)
    assert result.outcome == "infrastructure-error"


def test_a_job_within_its_disk_limit_runs_as_before(world):
    from vmloader.bootstrapper.disklimit import MIB, DiskLimit
    rig = Rig(world)
    result = rig.run("true", snapshot="never", disk_limit=DiskLimit(64 * MIB))
    assert result.exit_status == 0, result.error
    assert "pause" not in rig.fake.kinds()


class UefiImageCache(OneImageCache):
    """A stock image that boots with UEFI (its own boot loader, no kernel beside it)."""

    def __init__(self, root: Path):
        super().__init__(root)
        disk = self.image.paths["disk"]
        self.image = ResolvedImage(ImageEntry("fake", "1", boot="uefi",
                                              artifacts={"disk": Artifact("file:///disk", "d" * 64, 4)}),
                                   {"disk": disk})


@pytest.fixture
def ovmf_dir(world, monkeypatch):
    firmware = world / "ovmf"
    firmware.mkdir()
    (firmware / "OVMF_CODE_4M.fd").write_bytes(b"code")
    (firmware / "OVMF_VARS_4M.fd").write_bytes(b"empty variable store")
    monkeypatch.setenv("VMLOADER_OVMF_DIR", str(firmware))
    return firmware


@pytest.mark.skipif(shutil.which("mcopy") is None, reason="mtools missing (the cloud-init seed)")
def test_a_uefi_jobs_variable_store_is_kept_with_its_snapshot_and_a_booted_snapshot_starts_from_a_copy(
        world, ovmf_dir):
    rig = Rig(world)
    rig.cache = UefiImageCache(world)
    first = rig.run("true", snapshot="always")
    assert first.exit_status == 0, first.error
    snap = rig.store.get(first.snapshot)
    assert snap.uefi_vars.read_bytes() == b"empty variable store"       # moved in with the disk
    assert (snap.uefi_vars.stat().st_mode & 0o077) == 0
    assert not Path(first.job_dir, "uefi-vars.fd").exists()
    snap.uefi_vars.write_bytes(b"boot entries the guest wrote")         # as OVMF does while the guest runs

    again = rig.run("true", snapshot="always", from_snapshot=snap.meta.id)
    assert again.exit_status == 0, again.error
    xml = ET.fromstring(rig.job_file(again, "domain.xml"))
    assert xml.findtext("os/nvram") == str(Path(again.job_dir, "uefi-vars.fd"))     # a copy, not the kept file
    assert xml.findtext("os/loader") == str(ovmf_dir / "OVMF_CODE_4M.fd")
    assert rig.store.get(again.snapshot).uefi_vars.read_bytes() == b"boot entries the guest wrote"
    assert snap.uefi_vars.read_bytes() == b"boot entries the guest wrote"    # the snapshot is only read

    dropped = rig.run("true", snapshot="never", from_snapshot=snap.meta.id)
    assert dropped.exit_status == 0, dropped.error
    assert not Path(dropped.job_dir, "uefi-vars.fd").exists()


def test_a_uefi_image_on_a_worker_without_ovmf_fails_125_naming_the_package_and_leaves_nothing(
        world, monkeypatch):
    monkeypatch.setenv("VMLOADER_OVMF_DIR", str(world / "no-such-dir"))
    rig = Rig(world)
    rig.cache = UefiImageCache(world)
    before = rig.cache.image.paths["disk"].read_bytes()
    result = rig.run("true", snapshot="always")
    assert result.exit_status == EXIT_INFRA and result.snapshot is None
    assert result.error["phase"] == "define"
    assert "no OVMF firmware" in result.error["message"]
    assert "apt-get install ovmf" in result.error["hint"]
    assert "create" not in rig.fake.kinds()                               # no VM was ever defined
    left = {path.name for path in Path(result.job_dir).iterdir()}
    assert not left & {"overlay.qcow2", "cidata.img", "uefi-vars.fd", "domain.xml"}
    assert rig.cache.image.paths["disk"].read_bytes() == before


class BiosImageCache(OneImageCache):
    """A stock image with its own boot loader in the MBR (no kernel beside it)."""

    def __init__(self, root: Path):
        super().__init__(root)
        raw, disk = root / "mbr.raw", self.image.paths["disk"]
        raw.write_bytes((b"\xeb\x63\x90" + bytes(507) + b"\x55\xaa").ljust(1 << 20, b"\0"))   # boot code, signature
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], check=True)
        self.image = ResolvedImage(ImageEntry("fake", "1", boot="bios",
                                              artifacts={"disk": Artifact("file:///disk", "b" * 64, 4)}),
                                   {"disk": disk})


@pytest.mark.skipif(shutil.which("mcopy") is None, reason="mtools missing (the cloud-init seed)")
def test_a_stock_jobs_memory_snapshot_resumes_with_the_agent_it_had_not_a_second_delivery(world):
    rig = Rig(world, boot_timeout=10)
    rig.cache = BiosImageCache(world)
    frozen = rig.run("sh", "-c", "echo started; sleep 60", timeout=1.5, snapshot="on-failure")
    assert frozen.exit_status == EXIT_TIMEOUT and frozen.snapshot is not None
    # The image's later jobs go straight to qemu-ga; a resumed VM already runs its agent (a second
    # one would find the port taken), so that memory must not apply to it.
    DeliveryMemory(rig.config.state_dir / DELIVERIES_DIR).remember("b" * 64, "qemu-guest-agent")
    again = rig.run("echo", "resumed", snapshot="never", from_snapshot=frozen.snapshot)
    assert again.exit_status == 0, again.error
    assert rig.out.getvalue().decode().splitlines()[-1] == "resumed"
    assert DeliveryMemory(rig.config.state_dir / DELIVERIES_DIR).recall("b" * 64) == "qemu-guest-agent"

"""Warm start against the fake machine: plan choice, lanes, fallback to cold, teardown."""
import json
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmloader.agent import server
from vmloader.bootstrapper import warm
from vmloader.bootstrapper.config import Config, load
from vmloader.bootstrapper.errors import EXIT_INFRA, EXIT_TIMEOUT

from test_job_runner import (QEMU, BiosImageCache, Rig, UefiImageCache, ovmf_dir, torn_down,  # noqa: F401
                             world)  # (world, ovmf_dir: fixtures)

XEN = type(QEMU)("xen", True, "fake", "test:///fake", "xen")


def store_of(rig: Rig) -> warm.WarmStore:
    return warm.WarmStore(warm.warm_root(rig.config), 4)


def lanes_of(rig: Rig) -> list:
    return [state["lane"] for state in store_of(rig).states()]


def warm_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("vmloader: warm state for")]


def test_the_first_job_builds_a_lane_and_every_later_one_restores_it(world):
    rig = Rig(world, warm_start=True)
    first = rig.run("echo", "one", snapshot="never")
    assert first.exit_status == 0, first.error
    assert first.start == "warm" and "warm build" in first.timings and "restore" in first.timings
    [lane] = lanes_of(rig)
    assert lane.memory.is_file() and lane.disk.is_file() and lane.complete()
    kinds = rig.fake.kinds()
    assert kinds.index("create") < kinds.index("save") < kinds.index("restore")
    rig.fake.events.clear()
    second = rig.run("echo", "two", snapshot="never")
    assert second.exit_status == 0 and second.start == "warm"
    assert "create" not in rig.fake.kinds() and ("restore", lane.domain_name) in rig.fake.events
    assert "warm build" not in second.timings and "identity" in second.timings
    assert rig.out.getvalue().decode().split() == ["one", "two"]
    assert json.loads(rig.job_file(second, "owner.json"))["domain"] == lane.domain_name
    assert torn_down(rig.fake)
    with store_of(rig).acquire(lane.key) as held:       # the lane's lock was let go after teardown
        assert held is not None and held.lane == lane


def test_each_job_gets_its_own_identity(world):
    rig = Rig(world, warm_start=True)
    a, b = rig.run("true", snapshot="never"), rig.run("true", snapshot="never")
    first, second = rig.fake.identities[-2:]
    assert first["entropy"] != second["entropy"] and len(first["entropy"]) == 64
    assert first["machine_id"] != second["machine_id"] and len(first["machine_id"]) == 32
    assert (first["hostname"], second["hostname"]) == (f"vm-{a.job_id[-6:]}", f"vm-{b.job_id[-6:]}")
    # the warm state holds no per-job part: the hostname is given after restore, not on the cmdline
    assert "vmloader.hostname" not in json.dumps(lanes_of(rig)[0].meta()["parts"])


@pytest.mark.parametrize("why, rig_options, spec", [
    ("--cold", {}, {"cold": True}),
    ("warm_start = false", {"warm_start": False}, {}),
    ("a job that may be frozen with its memory", {}, {"timeout": 30.0, "snapshot": "on-failure"})])
def test_these_jobs_boot_cold(world, why, rig_options, spec):
    rig = Rig(world, **{"warm_start": True, **rig_options})
    result = rig.run("true", **{"snapshot": "never", **spec})
    assert result.exit_status == 0 and result.start == "cold", why
    assert "restore" not in rig.fake.kinds() and "save" not in rig.fake.kinds() and not lanes_of(rig)


def test_a_kept_snapshot_and_a_non_qemu_hypervisor_boot_cold(world):
    rig = Rig(world, warm_start=True)
    kept = rig.run("false", snapshot="always")
    again = rig.run("true", snapshot="never", from_snapshot=kept.snapshot)
    assert again.exit_status == 0 and again.start == "cold"
    from vmloader.bootstrapper.job import JobRunner, JobSpec
    runner = JobRunner(rig.config, rig.cache, rig.store, lambda: XEN, stdout=rig.out, stderr=rig.err,
                       connect=rig.fake)
    assert not runner._may_start_warm(type("J", (), {"spec": JobSpec("fake", ("true",)),
                                                     "plan": None})(), rig.cache.image, XEN)


def test_the_config_setting_and_its_environment_variable():
    assert Config(cache_dir=Path("/c"), state_dir=Path("/s")).warm_start is True      # the default
    assert load(environ={"VMLOADER_WARM_START": "true"}, files=()).warm_start is True
    assert load(environ={"VMLOADER_WARM_START": "false"}, files=()).warm_start is False
    assert load(environ={"VMLOADER_WARM_LANES": "3"}, files=()).warm_lanes == 3


def test_a_busy_lane_makes_the_next_job_build_another_and_the_cap_makes_it_cold(world):
    rig = Rig(world, warm_start=True, warm_lanes=2)
    rig.run("true", snapshot="never")
    [lane0] = lanes_of(rig)
    store = warm.WarmStore(warm.warm_root(rig.config), 2)
    with store.acquire(lane0.key) as held0:                 # another job restores lane 0 right now
        assert held0.lane.number == 0
        second = rig.run("true", snapshot="never")
        assert second.start == "warm"
        assert sorted(lane.number for lane in lanes_of(rig)) == [0, 1]
        with store.acquire(lane0.key) as held1:             # and lane 1: the cap is reached
            assert held1.lane.number == 1
            third = rig.run("true", snapshot="never")
            assert third.exit_status == 0 and third.start == "cold"
            assert store.acquire(lane0.key) is None


def test_two_jobs_at_once_both_start_warm(world):
    rig = Rig(world, warm_start=True)
    rig.run("true", snapshot="never")                      # lane 0 built
    results = []
    threads = [threading.Thread(target=lambda: results.append(rig.run("sleep", "1", snapshot="never")))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.exit_status for r in results] == [0, 0] and [r.start for r in results] == ["warm", "warm"]
    assert len(lanes_of(rig)) == 2                         # the second job built lane 1 on demand


def _fallback(rig: Rig, capsys, **spec):
    rig.run("true", snapshot="never")                      # builds the state
    capsys.readouterr()
    rig.fake.events.clear()
    result = rig.run("echo", "still runs", snapshot="never", **spec)
    err = capsys.readouterr().err
    assert result.exit_status == 0, result.error
    assert result.start == "cold" and ("create", f"vmloader-{result.job_id}") in rig.fake.events
    assert len(warm_lines(err)) == 1, err
    assert not lanes_of(rig)                               # dropped: the next job rebuilds it
    assert torn_down(rig.fake) and all(not m.is_active() for m in rig.fake.machines)
    return warm_lines(err)[0]


def test_a_state_libvirt_cannot_restore_is_dropped_and_the_job_boots_cold(world, capsys):
    rig = Rig(world, warm_start=True)
    rig.run("true", snapshot="never")
    rig.fake.restore_fails = True
    line = _fallback(rig, capsys)
    assert line.startswith("vmloader: warm state for fake@1 unusable (restoring it failed")
    assert line.endswith("booting cold and rebuilding it")
    rig.fake.restore_fails = False
    again = rig.run("true", snapshot="never")
    assert again.start == "warm" and "warm build" in again.timings


def test_a_restored_guest_whose_agent_stays_silent_is_dropped(world, capsys, monkeypatch):
    monkeypatch.setattr(warm, "AGENT_SILENCE", 1.0)
    rig = Rig(world, warm_start=True)
    rig.run("true", snapshot="never")
    rig.fake.restore_answers = False
    assert "did not answer within 1 s after restore" in _fallback(rig, capsys)


def test_a_guest_that_cannot_take_its_identity_is_dropped(world, capsys):
    rig = Rig(world, warm_start=True)
    rig.run("true", snapshot="never")
    rig.fake.identity_fails = True
    rig.fake.events.clear()
    result = rig.run("true", snapshot="never")
    # the cold boot asks too, and fails as well: the job is an infrastructure error then, not a guess
    assert "could not take a new identity" in capsys.readouterr().err
    assert result.exit_status != 0 and torn_down(rig.fake)


@pytest.mark.parametrize("damage", ["flip", "truncate", "meta"])
def test_a_damaged_state_is_dropped_before_restoring(world, capsys, damage):
    rig = Rig(world, warm_start=True)
    rig.run("true", snapshot="never")
    [lane] = lanes_of(rig)
    if damage == "flip":
        data = bytearray(lane.memory.read_bytes())
        data[len(data) // 2] ^= 0x01
        lane.memory.write_bytes(bytes(data))
    elif damage == "truncate":
        os.truncate(lane.memory, lane.memory.stat().st_size // 2)
    else:
        lane.meta_path.unlink()                             # never completed: rebuilt, not an error
    capsys.readouterr()
    rig.fake.events.clear()
    result = rig.run("true", snapshot="never")
    err = capsys.readouterr().err
    assert result.exit_status == 0
    if damage == "meta":
        assert result.start == "warm" and "warm build" in result.timings and not warm_lines(err)
    else:
        assert result.start == "cold" and "restore" not in rig.fake.kinds()
        assert warm_lines(err) == [f"vmloader: warm state for fake@1 unusable (memory.save differs from what "
                                   f"was saved); booting cold and rebuilding it"]


@pytest.mark.parametrize("what", ["files", "directory"])
def test_a_state_deleted_after_the_job_took_its_lane_is_dropped_and_the_job_boots_cold(world, capsys,
                                                                                       monkeypatch, what):
    rig = Rig(world, warm_start=True)
    rig.run("true", snapshot="never")
    [lane] = lanes_of(rig)
    touch = warm.Lane.touch

    def touch_then_delete(self):               # checked and held by the job; then removed by hand
        touch(self)
        if what == "directory":
            shutil.rmtree(self.dir)
        else:
            for name in ("memory.save", "disk.qcow2", "meta.json"):
                (self.dir / name).unlink()
    monkeypatch.setattr(warm.Lane, "touch", touch_then_delete)
    capsys.readouterr()
    rig.fake.events.clear()
    result = rig.run("echo", "still runs", snapshot="never")
    err = capsys.readouterr().err
    assert result.exit_status == 0 and result.start == "cold", result.error
    assert "restore" not in rig.fake.kinds()
    [line] = [line for line in err.splitlines() if line.startswith("vmloader:")]   # none about the vanished dir
    assert line == ("vmloader: warm state for fake@1 unusable (its disk layer was removed after it was "
                           "checked); booting cold and rebuilding it")
    assert torn_down(rig.fake) and not Path(result.job_dir, "overlay.qcow2").exists()
    monkeypatch.setattr(warm.Lane, "touch", touch)
    again = rig.run("true", snapshot="never")
    assert again.start == "warm" and "warm build" in again.timings
    assert lanes_of(rig) == [lane]


def test_a_state_copied_elsewhere_with_the_same_bytes_is_still_used(world):
    rig = Rig(world, warm_start=True)
    rig.run("true", snapshot="never")
    [lane] = lanes_of(rig)
    data = lane.memory.read_bytes()
    lane.memory.unlink()
    lane.memory.write_bytes(data)                           # new inode and mtime: re-hashed, same sha256
    assert rig.run("true", snapshot="never").start == "warm"


def test_two_caches_warming_one_image_and_shape_name_their_vms_apart(tmp_path):
    key = "ab" * 32
    a = warm.Lane(tmp_path / "a" / "warm" / key[:32] / "lane-0", key, 0)
    b = warm.Lane(tmp_path / "b" / "warm" / key[:32] / "lane-0", key, 0)
    assert a.domain_name != b.domain_name                  # one libvirt daemon holds both caches' VMs
    assert a.domain_name == warm.Lane(a.dir, key, 0, shared=True, borrowed=True).domain_name
    assert a.domain_name.startswith(f"vmloader-warm-{key[:12]}-") and a.domain_name.endswith("-0")
    assert warm.Lane(a.dir.parent / "lane-1", key, 1).domain_name.endswith("-1")
    (tmp_path / "a-link").symlink_to(tmp_path / "a")              # one cache named by another path
    assert warm.Lane(tmp_path / "a-link" / "warm" / key[:32] / "lane-0", key, 0).domain_name == a.domain_name


def test_a_failed_save_during_the_build_leaves_nothing_and_the_job_runs_cold(world, capsys):
    rig = Rig(world, warm_start=True, save_fails=True)
    result = rig.run("echo", "ok", snapshot="never")
    assert result.exit_status == 0 and result.start == "cold"
    assert "could not save a warm state for fake@1" in capsys.readouterr().err
    assert not lanes_of(rig)
    [lane_dir] = list(warm.warm_root(rig.config).glob("*/lane-0"))
    assert sorted(p.name for p in lane_dir.iterdir()) == ["lock", "share.lock"]     # (root: a shared lane)
    assert all(not m.is_active() for m in rig.fake.machines)


def test_a_build_that_ran_out_of_space_is_not_tried_again_until_there_is_more_room(world, capsys, monkeypatch):
    rig = Rig(world, warm_start=True, save_fails="cannot write memory.save.tmp: No space left on device")
    free = {"now": 40 * 2 ** 20}
    monkeypatch.setattr(warm.WarmStore, "free_bytes", lambda self, key: free["now"])
    first = rig.run("true", snapshot="never")
    assert first.start == "cold" and "could not save a warm state" in capsys.readouterr().err
    builds = rig.fake.kinds().count("save")
    second = rig.run("true", snapshot="never")             # no more room than then: no doomed build
    err = capsys.readouterr().err
    assert second.exit_status == 0 and second.start == "cold" and rig.fake.kinds().count("save") == builds
    assert [line for line in err.splitlines() if line.startswith("vmloader:")] == [
        f"vmloader: no room for a warm state of fake@1 in {warm.warm_root(rig.config)} (saving one ran out of "
        f"space with 40 MiB free, 40 MiB free now); booting cold"]
    assert not lanes_of(rig)
    free["now"] += 2 ** 20                                 # something was freed: worth another try
    rig.fake.save_fails = False
    third = rig.run("true", snapshot="never")
    assert third.start == "warm" and "warm build" in third.timings
    assert not list(warm.warm_root(rig.config).glob("*/" + warm.NO_ROOM))


def test_a_build_failing_for_another_reason_is_tried_again_by_the_next_job(world, capsys):
    rig = Rig(world, warm_start=True, save_fails=True)
    rig.run("true", snapshot="never")
    rig.run("true", snapshot="never")
    assert rig.fake.kinds().count("save") == 2 and "no room" not in capsys.readouterr().err


def test_a_job_that_keeps_nothing_is_destroyed_without_the_agent_sync(world):
    rig = Rig(world, warm_start=True)
    rig.run("true", snapshot="never")
    rig.fake.events.clear()
    rig.run("true", snapshot="never")
    assert "shutdown" not in rig.fake.kinds() and "kill" in rig.fake.kinds()
    rig.fake.events.clear()
    rig.run("true", snapshot="always")
    assert "shutdown" in rig.fake.kinds()                    # the agent synced first: the disk is kept


def test_a_kept_snapshot_of_a_warm_job_no_longer_needs_the_lane(world):
    rig = Rig(world, warm_start=True)
    kept = rig.run("sh", "-c", "echo x > marker; exit 3", snapshot="on-failure")
    assert kept.start == "warm" and kept.exit_status == 3
    snap = rig.store.get(kept.snapshot)
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(snap.disk)],
                                     capture_output=True, check=True).stdout)
    assert info["backing-filename"] == str(rig.cache.image.disk)
    for lane in lanes_of(rig):
        lane.drop()
    again = rig.run("true", snapshot="never", from_snapshot=snap.meta.id)
    assert again.exit_status == 0, again.error


def test_states_are_summarised_per_image_and_shape_and_evicted_with_their_image(world):
    rig = Rig(world, warm_start=True)
    rig.run("true", snapshot="never")
    [row] = store_of(rig).summary()
    assert (row["image"], row["lanes"], row["cpus"], row["memory_mib"]) == ("fake@1", 1, 1, 1024)
    assert row["bytes"] > 0 and store_of(rig).total_bytes() == row["bytes"]
    assert store_of(rig).remove_image_states("d" * 64) == row["bytes"]
    assert not store_of(rig).summary()


# -- the agent's side --------------------------------------------------------------
def test_the_agent_reseeds_sets_clock_hostname_and_machine_id():
    root = Path(tempfile.mkdtemp())
    (root / "dev").mkdir()
    (root / "dev/urandom").write_bytes(b"")
    (root / "etc").mkdir()
    (root / "etc/machine-id").write_text("0" * 32 + "\n")
    (root / "var/lib/dbus").mkdir(parents=True)
    (root / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")
    calls = []
    identity = server.Identity(root=str(root), ioctl=lambda fd, req, arg: calls.append((req, arg)),
                               settime=lambda ns: calls.append(("time", ns)),
                               sethostname=lambda name: calls.append(("hostname", name)))
    entropy = bytes(range(64))
    assert identity.apply(entropy, "vm-abc123", "f" * 32, 1234) == []
    assert calls[0] == (server.RNDADDENTROPY, struct.pack("ii", 512, 64) + entropy)
    assert calls[1] == (server.RNDRESEEDCRNG, 0)
    assert ("time", 1234) in calls and ("hostname", "vm-abc123") in calls
    assert (root / "etc/hostname").read_text() == "vm-abc123\n"
    assert (root / "etc/machine-id").read_text() == "f" * 32 + "\n"
    assert (root / "var/lib/dbus/machine-id").read_text() == "f" * 32 + "\n"
    assert not (root / "var/lib/dbus/machine-id").is_symlink()


def test_the_agent_reports_what_it_could_not_do():
    def refuse(*args):
        raise PermissionError("not root")
    root = tempfile.mkdtemp()
    identity = server.Identity(root=root, ioctl=refuse, settime=refuse, sethostname=refuse)
    failed = identity.apply(b"x" * 64, "bad name!", "nothex", 1)
    assert [f.split(" (")[0] for f in failed] == ["reseed the random generator", "set the clock",
                                                   "set the hostname", "set the machine-id"]


def test_the_agent_announces_the_identity_feature():
    from vmloader import protocol as P
    assert "identity" in P.FEATURES and P.name_of(P.IDENTITY) == "IDENTITY"


def test_a_timeout_of_a_warm_capable_job_still_saves_memory(world):
    rig = Rig(world, warm_start=True)
    result = rig.run("sleep", "60", timeout=1.0, snapshot="on-failure")
    assert result.exit_status == EXIT_TIMEOUT and result.start == "cold"
    assert rig.store.get(result.snapshot).meta.memory


def test_eviction_counts_warm_states_and_drops_them_with_their_image(world):
    from vmloader.bootstrapper.cache import ImageCache
    rig = Rig(world, warm_start=True)
    rig.run("true", snapshot="never")
    [lane] = lanes_of(rig)
    size = store_of(rig).total_bytes()
    cache = ImageCache(rig.config.cache_dir)
    entry = rig.cache.image.entry.artifacts["disk"]
    (cache.artifacts_dir).mkdir(parents=True, exist_ok=True)
    (cache.artifacts_dir / entry.sha256).write_bytes(b"x" * 10)
    cache.index.touch(entry.sha256, 10, "fake@1")
    assert cache.evict(max_bytes=size + 20) == []                      # image + state fit
    assert lane.complete()
    with store_of(rig).acquire(lane.key):                               # a job restores it right now
        assert [e.sha256 for e in cache.evict(max_bytes=size)] == [entry.sha256]
        assert lane.complete()                                          # the state stays while held
    assert store_of(rig).remove_image_states(entry.sha256) == size and not lane.complete()


def test_an_image_that_never_boots_fails_once_with_its_console_not_twice(world, capsys):
    rig = Rig(world, warm_start=True, boot_timeout=2, boot_answers=False,
              console_text="Kernel panic - not syncing: no init found\n")
    result = rig.run("true")
    assert result.exit_status == 125 and result.error["phase"] == "boot"
    assert "Kernel panic" in result.error["message"]
    assert rig.fake.kinds().count("create") == 1 and "save" not in rig.fake.kinds()
    assert not lanes_of(rig) and torn_down(rig.fake)
    assert "warm state" not in capsys.readouterr().err


def test_images_warm_builds_one_lane_per_job_it_holds_at_once(world):
    from vmloader.bootstrapper import runners
    from vmloader.bootstrapper.job import JobRunner
    rig = Rig(world, warm_start=True)
    lines = []

    def make_runner(session):
        return JobRunner(rig.config, rig.cache, rig.store, lambda: QEMU, stdout=rig.out, stderr=rig.err,
                         connect=rig.fake, session=session)
    results = runners.warm_up(rig.config, "fake", lanes=2, progress=lines.append, make_runner=make_runner)
    assert [r.start for r in results] == ["warm", "warm"] and len(lanes_of(rig)) == 2
    assert sorted(line.split(" in ")[0] for line in lines) == ["fake: lane built", "fake: lane built"]
    again = runners.warm_up(rig.config, "fake", lanes=2, progress=lines.append, make_runner=make_runner)
    assert [r.start for r in again] == ["warm", "warm"] and lines[-1] == "fake: lane ready (already built)"


def test_an_agent_without_the_identity_feature_is_never_used_warm(world, capsys, monkeypatch):
    from vmloader import protocol as P
    monkeypatch.setattr(P, "FEATURES", ("list", "pty", "connect"))       # an older agent's HELLO
    rig = Rig(world, warm_start=True)
    result = rig.run("true", snapshot="never")
    assert result.exit_status == 0 and result.start == "cold"
    [line] = warm_lines(capsys.readouterr().err)
    assert "its agent is too old to take a new identity" in line
    assert "identity" not in rig.fake.kinds() and torn_down(rig.fake)


@pytest.mark.skipif(shutil.which("mcopy") is None, reason="mtools missing (the cloud-init seed)")
def test_a_stock_bios_image_starts_warm_with_the_agent_delivered_when_its_state_was_built(world):
    rig = Rig(world, warm_start=True)
    rig.cache = BiosImageCache(world)
    first = rig.run("echo", "one", snapshot="never")
    assert first.exit_status == 0 and first.start == "warm", first.error
    [lane] = lanes_of(rig)
    assert lane.meta()["parts"]["firmware"] == "bios"
    rig.fake.events.clear()
    second = rig.run("echo", "two", snapshot="never")
    assert second.exit_status == 0 and second.start == "warm", second.error
    assert "create" not in rig.fake.kinds() and ("restore", lane.domain_name) in rig.fake.events
    # The restored XML: the job's own overlay on the lane's disk, and its own cloud-init seed on vdb.
    disks = ET.fromstring(rig.job_file(second, "domain.xml")).findall("devices/disk")
    assert [d.find("source").get("file") for d in disks] == [str(Path(second.job_dir, "overlay.qcow2")),
                                                             str(Path(second.job_dir, "cidata.img"))]
    assert rig.out.getvalue().decode().split() == ["one", "two"]


@pytest.mark.skipif(shutil.which("mcopy") is None, reason="mtools missing (the cloud-init seed)")
def test_a_uefi_image_boots_cold_its_variable_store_is_outside_any_saved_state(world, ovmf_dir):
    rig = Rig(world, warm_start=True)
    rig.cache = UefiImageCache(world)
    result = rig.run("true", snapshot="never")
    assert result.exit_status == 0 and result.start == "cold", result.error
    assert "save" not in rig.fake.kinds() and not lanes_of(rig)


def test_a_bios_image_without_boot_code_fails_before_any_vm_not_in_a_warm_build(world, capsys):
    rig = Rig(world, warm_start=True)
    rig.cache = BiosImageCache(world)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(rig.cache.image.disk), "64M"], check=True)
    result = rig.run("true", snapshot="never")
    assert result.exit_status == EXIT_INFRA and result.error["phase"] == "boot"
    assert "cannot boot with SeaBIOS: its first sector holds no boot code" in result.error["message"]
    assert "create" not in rig.fake.kinds() and not lanes_of(rig)
    assert "warm state" not in capsys.readouterr().err


def _owners_at_each_create(rig: Rig, monkeypatch) -> list:
    """The domain the job's owner.json names at the moment each VM is created."""
    seen, create = [], rig.fake.create

    def recording(xml: str, paused: bool = False):
        [owner] = list((rig.config.state_dir / "jobs").glob("*/owner.json"))
        seen.append((ET.fromstring(xml).findtext("name"), json.loads(owner.read_text())["domain"]))
        return create(xml, paused=paused)
    monkeypatch.setattr(rig.fake, "create", recording)
    return seen


def test_while_a_warm_state_is_built_the_owner_record_names_the_builds_vm(world, monkeypatch):
    """A vmloader killed mid-build: the next one (`vmloader cleanup`) destroys the VM its owner.json names."""
    rig = Rig(world, warm_start=True)
    seen = _owners_at_each_create(rig, monkeypatch)
    result = rig.run("true", snapshot="never")
    [lane] = lanes_of(rig)
    assert result.start == "warm" and seen == [(lane.domain_name, lane.domain_name)]


def test_after_a_failed_build_the_owner_record_names_the_jobs_own_vm_again(world, capsys, monkeypatch):
    rig = Rig(world, warm_start=True, save_fails=True)
    seen = _owners_at_each_create(rig, monkeypatch)
    result = rig.run("true", snapshot="never")
    assert result.start == "cold" and "could not save a warm state" in capsys.readouterr().err
    (build, named_then), (cold, named_now) = seen
    assert build.startswith("vmloader-warm-") and named_then == build
    assert cold == named_now == f"vmloader-{result.job_id}"

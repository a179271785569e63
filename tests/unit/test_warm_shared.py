"""Root's warm states in the shared cache, restored read-only by unprivileged users' jobs (fake machine).

The unit tests run as one user: a "user's" job is one whose config sees the shared cache as
another's (`warm.shared_root`) and whose libvirt daemon is its own (`XDG_RUNTIME_DIR`).
"""
import dataclasses
import fcntl
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from vmloader.bootstrapper import virt, warm
from vmloader.bootstrapper.domain import retarget_saved_xml

from test_job_runner import Rig, torn_down, world  # noqa: F401  (world: the fixture)
from test_domain import spec as domain_spec  # noqa: F401


def digests(lane: warm.Lane) -> dict:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(lane.dir.iterdir())}


@pytest.fixture
def as_user(world, monkeypatch):
    """Root built a lane; from here on the rig's jobs are an unprivileged user's."""
    rig = Rig(world, warm_start=True)
    built = rig.run("true", snapshot="never")
    assert built.start == "warm"
    [state] = list(warm.own_store(rig.config, 4).states())
    runtime = world / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setattr(warm, "shared_root", lambda cfg: cfg.cache_dir / "warm")
    monkeypatch.setattr(warm, "own_store", lambda cfg, lanes: warm.WarmStore(world / "own" / "warm", lanes))
    monkeypatch.setattr(virt, "default_uri", lambda hypervisor, euid: "test:///fake")   # (the fake's)
    rig.fake.events.clear()
    found = state["lane"]
    return rig, warm.Lane(found.dir, state["meta"]["key"], found.number, shared=True)


def test_a_users_job_restores_roots_shared_state_and_never_writes_it(as_user, capsys):
    rig, lane = as_user
    before = digests(lane)
    result = rig.run("echo", "borrowed", snapshot="never")
    assert result.exit_status == 0 and result.start == "warm", result.error
    assert ("restore", lane.domain_name) in rig.fake.events and "save" not in rig.fake.kinds()
    assert "warm build" not in result.timings
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("vmloader:")] == []
    assert digests(lane) == before                      # not even meta.json's last_used
    assert not list((rig.root / "own").glob("warm/*/lane-*/meta.json"))     # nothing built of its own
    assert "<resource>" not in rig.job_file(result, "domain.xml")
    assert torn_down(rig.fake)
    with open(lane.dir / warm.SHARE_LOCK) as share:      # the users' lock was let go
        fcntl.flock(share, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_roots_shared_lanes_are_readable_by_all_and_writable_by_root_alone(as_user):
    _, lane = as_user
    for path in (lane.dir.parent.parent, lane.dir.parent, lane.dir):
        assert path.stat().st_mode & 0o777 == 0o755
    for name in ("memory.save", "disk.qcow2", "meta.json", warm.SHARE_LOCK):
        assert (lane.dir / name).stat().st_mode & 0o777 == 0o644, name
    assert (lane.dir / "lock").stat().st_mode & 0o777 == 0o600


def test_a_shared_state_that_fails_here_is_left_alone_and_the_user_goes_their_own_way(as_user, capsys):
    rig, lane = as_user
    before = digests(lane)
    rig.fake.restore_fails = True
    result = rig.run("echo", "still runs", snapshot="never")
    err = capsys.readouterr().err
    assert result.exit_status == 0 and result.start == "cold", result.error
    # (the fake refuses every restore: the user's own state, built next, fails too and says so)
    line, *own = [line for line in err.splitlines() if line.startswith("vmloader:")]
    assert all(o.startswith("vmloader: warm state for fake@1 unusable") for o in own), err
    assert line.startswith("vmloader: the shared warm state for fake@1 is unusable here (restoring it failed")
    assert digests(lane) == before and lane.complete()
    rig.fake.restore_fails = False
    rig.fake.events.clear()
    again = rig.run("true", snapshot="never")            # not borrowed again: the user's own state
    assert again.start == "warm" and "warm build" in again.timings
    assert ("restore", lane.domain_name) not in rig.fake.events[:2]
    assert list((rig.root / "own").glob("warm/*/lane-*/meta.json"))


def test_a_lane_running_in_this_users_daemon_is_not_borrowed_twice(as_user, tmp_path):
    _, lane = as_user
    shared = warm.SharedWarm(lane.dir.parent.parent, tmp_path / "daemon")
    first = shared.borrow(lane.key)
    assert first is not None and first.lane.dir == lane.dir and first.lane.borrowed
    assert shared.borrow(lane.key) is None                     # same daemon: the name would collide
    assert warm.SharedWarm(lane.dir.parent.parent, tmp_path / "other-daemon").borrow(lane.key) is not None
    first.close()
    assert shared.borrow(lane.key) is not None


@pytest.mark.parametrize("tamper", ["group-writable", "stamp", "symlink"])
def test_a_shared_lane_that_is_not_exactly_roots_is_not_borrowed(as_user, tmp_path, tamper):
    _, lane = as_user
    if tamper == "group-writable":
        os.chmod(lane.memory, 0o664)
    elif tamper == "stamp":
        os.utime(lane.memory, ns=(0, 0))
    else:
        target = tmp_path / "elsewhere.save"
        target.write_bytes(lane.memory.read_bytes())
        lane.memory.unlink()
        lane.memory.symlink_to(target)
    assert warm.SharedWarm(lane.dir.parent.parent, tmp_path / "daemon").borrow(lane.key) is None


def test_root_dropping_a_lane_waits_for_a_users_restore_but_not_forever(as_user, tmp_path):
    _, lane = as_user
    held = warm.SharedWarm(lane.dir.parent.parent, tmp_path / "daemon").borrow(lane.key)
    assert held is not None
    other = warm.SharedWarm(lane.dir.parent.parent, tmp_path / "d2").borrow(lane.key)     # (shared)
    assert other is not None
    other.close()
    started = time.monotonic()
    threading.Timer(0.5, held.restored).start()               # the restore ends
    lane.drop(grace=60)
    assert 0.4 < time.monotonic() - started < 30 and not lane.memory.exists()


def test_a_user_holding_the_shared_lock_forever_delays_root_only_by_the_grace(as_user, tmp_path):
    _, lane = as_user
    stuck = os.open(lane.dir / warm.SHARE_LOCK, os.O_RDONLY)
    fcntl.flock(stuck, fcntl.LOCK_SH)
    try:
        lane.drop(grace=0.3)
        assert not lane.memory.exists() and not lane.complete()
    finally:
        os.close(stuck)


def test_a_lane_root_is_dropping_is_not_borrowed(as_user, tmp_path):
    _, lane = as_user
    dropping = os.open(lane.dir / warm.SHARE_LOCK, os.O_RDONLY)
    fcntl.flock(dropping, fcntl.LOCK_EX)
    try:
        assert warm.SharedWarm(lane.dir.parent.parent, tmp_path / "daemon").borrow(lane.key) is None
    finally:
        os.close(dropping)


def test_the_cache_owner_has_no_shared_states_to_borrow(tmp_path):
    from vmloader.bootstrapper.config import Config
    cfg = Config(cache_dir=tmp_path / "cache", state_dir=tmp_path / "state")
    assert warm.shared_root(cfg) is None


def test_a_state_saved_by_the_system_daemon_loses_its_system_only_parts_for_a_session_restore():
    saved = ("<domain type='qemu'><name>old</name><uuid>u</uuid><resource><partition>/machine</partition>"
             "</resource><seclabel type='dynamic' model='dac'/><devices><disk type='file' device='disk'>"
             "<source file='/old'><seclabel model='dac' relabel='yes'/></source><target dev='vda'/></disk>"
             "</devices></domain>")
    spec = domain_spec()
    foreign = retarget_saved_xml(saved, spec, foreign=True)
    assert "resource" not in foreign and "dac' relabel='yes'" not in foreign and 'type="dynamic"' not in foreign
    assert "<uuid>u</uuid>" in foreign                  # the ABI (and the uuid) stay as saved
    own = retarget_saved_xml(saved, spec)
    assert "<resource>" in own and 'type="dynamic"' in own


class EntriesCache:
    def __init__(self, entries: dict):
        self.entries = entries

    def cached_entries(self) -> dict:
        return self.entries


def probe(rig: Rig, monkeypatch, **config) -> dict:
    from vmloader.bootstrapper import condor, hypervisors
    from vmloader.bootstrapper.cache import ImageCache
    monkeypatch.setattr(ImageCache, "configured", staticmethod(lambda cfg: EntriesCache({
        "fake": rig.cache.image.entry, "other": type(rig.cache.image.entry)("other", "1")})))
    monkeypatch.setattr(hypervisors, "detect", lambda probes: [])
    cfg = type(rig.config)(**{**rig.config.__dict__, **config}) if config else rig.config
    return dict(line.split(" = ", 1) for line in condor.probe_lines(cfg))


def test_the_startd_probe_advertises_images_with_a_usable_shared_warm_state(world, monkeypatch):
    rig = Rig(world, warm_start=True)
    assert probe(rig, monkeypatch)["VMLoaderWarmImages"] == '""'          # nothing warmed yet
    rig.run("true", snapshot="never", cpus=2)                             # not the default shape
    assert probe(rig, monkeypatch)["VMLoaderWarmImages"] == '""'
    rig.run("true", snapshot="never")
    ad = probe(rig, monkeypatch)
    assert ad["VMLoaderWarmImages"] == '"fake"' and ad["VMLoaderImages"] == '"fake,other"'
    assert probe(rig, monkeypatch, warm_start=False)["VMLoaderWarmImages"] == '""'   # jobs would boot
    [lane] = [s["lane"] for s in warm.WarmStore(warm.warm_root(rig.config), 0).states()
              if s["meta"]["parts"]["cpus"] != 2]
    meta = lane.meta()
    lane._write_meta(dict(meta, domain=f"vmloader-warm-{lane.key[:12]}-0"))   # saved under another name
    assert probe(rig, monkeypatch)["VMLoaderWarmImages"] == '""'          # (libvirt would not restore it)
    lane._write_meta(meta)
    assert probe(rig, monkeypatch)["VMLoaderWarmImages"] == '"fake"'
    os.utime(lane.memory, ns=(0, 0))                                      # not the bytes saved
    assert probe(rig, monkeypatch)["VMLoaderWarmImages"] == '""'


def test_the_schedd_transform_ranks_a_warm_worker_above_one_with_the_image_alone():
    import re
    conf = (Path(__file__).resolve().parents[2] / "condor" / "config.d" / "50-vmloader-schedd.conf").read_text()
    [rank] = [line.strip() for line in conf.splitlines() if line.strip().startswith("SET Rank ")]
    terms = re.findall(r'ifThenElse\(StringListMember\(MY\.VMImage, TARGET\.(\w+) \?: ""\), (\d+), 0\)', rank)
    weights = {attr: int(weight) for attr, weight in terms}
    assert set(weights) == {"VMLoaderImages", "VMLoaderWarmImages"}, rank

    def score(worker: dict) -> int:
        return sum(w for attr, w in weights.items() if "debian-12" in worker.get(attr, "").split(","))
    nothing, cached, warmed = {}, {"VMLoaderImages": "debian-12"}, {
        "VMLoaderImages": "debian-12", "VMLoaderWarmImages": "debian-12"}
    assert score(warmed) > score(cached) > score(nothing)


def test_an_htcondor_job_restores_roots_state_but_never_builds_one_of_its_own(world):
    """A state built inside a job would be charged to its slot (memory, disk) for that user's later
    jobs only: the wrapper's jobs borrow root's shared states and otherwise boot cold."""
    from vmloader.bootstrapper.condor import _machine_overrides
    assert _machine_overrides(None)["warm_own_states"] is False
    rig = Rig(world, warm_start=True)
    rig.config = dataclasses.replace(rig.config, warm_own_states=False)
    result = rig.run("true", snapshot="never")
    assert result.start == "cold"
    assert list(warm.own_store(rig.config, 4).states()) == []
    rig.config = dataclasses.replace(rig.config, warm_own_states=True)      # (the same job elsewhere: warm)
    assert rig.run("true", snapshot="never").start == "warm"

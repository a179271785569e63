"""Root's cache service keeps warm states of the images `keep_warm` names (warmkeeper.py), with the
fake machine: the builds are real `images warm` runs of the runner, the lanes real files."""
import dataclasses
import threading
from pathlib import Path

from vmloader.bootstrapper import cacheservice, runners, warm, warmkeeper
from vmloader.bootstrapper.catalog import Artifact, ImageEntry
from vmloader.bootstrapper.config import Config
from vmloader.bootstrapper.job import JobRunner

from test_job_runner import QEMU, Rig, world  # noqa: F401  (world: the fixture)


def keeping(rig: Rig, *names: str, lanes: int = 2) -> Rig:
    rig.config = dataclasses.replace(rig.config, keep_warm=names, warm_lanes=lanes)
    return rig


def builder(rig: Rig, built: list):
    """A keeper's build: `images warm NAME --lanes N` through the rig's runner (fake machine)."""
    def build(name: str, lanes: int) -> bool:
        built.append((name, lanes))

        def make_runner(session):
            return JobRunner(rig.config, rig.cache, rig.store, lambda: QEMU, stdout=rig.out, stderr=rig.err,
                             connect=rig.fake, session=session)
        results = runners.warm_up(rig.config, name, lanes=lanes, make_runner=make_runner)
        return all(r.start == "warm" for r in results)
    return build


def entry(name: str, disk: str, boot: str = "direct-kernel") -> ImageEntry:
    return ImageEntry(name, "1", boot=boot, artifacts={"disk": Artifact("file:///d", disk * 64, 4)})


def config_with(**fields):
    return Config(cache_dir=Path("/nonexistent/cache"), state_dir=Path("/nonexistent/state"), **fields)


def test_the_keeper_builds_the_missing_lanes_of_the_images_it_keeps_then_leaves_them_be(world):
    rig = keeping(Rig(world, warm_start=True), "fake")
    built, log = [], []
    entries = {"fake": rig.cache.image.entry, "other": entry("other", "b")}   # other: not kept
    keeper = warmkeeper.WarmKeeper(rig.config, lambda: entries, log.append, build=builder(rig, built))
    assert warm.shared_warm_lanes(rig.config, entries) == {"fake": 0, "other": 0}
    assert keeper.run_once() == ["fake"] and built == [("fake", 2)]
    assert warm.shared_warm_lanes(rig.config, entries) == {"fake": 2, "other": 0}
    assert warm.shared_warm_images(rig.config, entries) == ["fake"]       # what the probe advertises
    assert "fake has 0 of 2 lane(s)" in log[0] and "fake: 2 lane(s) ready" in log[1]
    assert keeper.run_once() == [] and len(built) == 1                     # complete: not even checked
    # A lane gone (evicted, or stale after an upgrade): the next look builds it again.
    [lane, _] = [s["lane"] for s in warm.WarmStore(warm.warm_root(rig.config), 0).states()]
    lane.drop(grace=0)
    assert warm.shared_warm_lanes(rig.config, entries)["fake"] == 1
    assert keeper.run_once() == ["fake"] and warm.shared_warm_lanes(rig.config, entries)["fake"] == 2


def test_a_failed_build_is_tried_again_only_after_an_hour():
    now = [1000.0]
    cfg = config_with(keep_warm=("debian-12",))
    attempts, log = [], []
    keeper = warmkeeper.WarmKeeper(cfg, lambda: {"debian-12": entry("debian-12", "a")}, log.append,
                                   build=lambda name, lanes: attempts.append(name) or False,
                                   lanes_of=lambda found: {name: 0 for name in found}, clock=lambda: now[0])
    assert keeper.run_once() == ["debian-12"]
    assert "the build failed" in log[-1] and "boot cold meanwhile" in log[-1]
    now[0] += warmkeeper.RETRY_AFTER - 1
    assert keeper.run_once() == [] and attempts == ["debian-12"]
    now[0] += 2
    assert keeper.run_once() == ["debian-12"] and len(attempts) == 2


def test_what_is_kept_all_images_once_each_never_uefi_nothing_unless_named_or_warm_start_off():
    entries = {"debian-12": entry("debian-12", "a"), "debian": entry("debian", "a"),      # an alias
               "stock": entry("stock", "c", boot="bios"), "trixie-uefi": entry("trixie-uefi", "d", boot="uefi"),
               "kernel-only": ImageEntry("kernel-only", "1")}

    def wanted(have=None, **fields):
        found = warmkeeper.wanted(config_with(**fields), entries, lambda names: {n: (have or {}).get(n, 0) for n in names})
        return [(w.name, w.lanes, w.have) for w in found]
    assert wanted() == []                                                   # the default keeps nothing
    assert wanted(keep_warm=("*",), warm_lanes=3) == [("debian", 3, 0), ("stock", 3, 0)]
    assert wanted(keep_warm=("debian-12", "trixie-uefi"), warm_lanes=1) == [("debian-12", 1, 0)]
    assert wanted(keep_warm=("*",), warm_start=False) == []
    assert wanted({"debian": 2}, keep_warm=("*",), warm_lanes=2) == [("stock", 2, 0)]
    assert wanted({"debian": 1}, keep_warm=("*",), warm_lanes=2)[0] == ("debian", 2, 1)
    assert warmkeeper.lanes_wanted(config_with()) >= 1                          # 0: one per host CPU


def test_the_cache_service_keeps_warm_only_for_root_with_warm_start_and_wakes_the_keeper_on_each_fetch(
        tmp_path, monkeypatch):
    log = []
    assert cacheservice._keeper(config_with(), log.append) is None
    assert cacheservice._keeper(config_with(keep_warm=("*",), warm_start=False), log.append) is None
    assert "warm_start is off" in log[-1]
    monkeypatch.setattr(cacheservice.os, "geteuid", lambda: 1000)
    assert cacheservice._keeper(config_with(keep_warm=("*",)), log.append) is None
    assert "only root's warm states" in log[-1]
    monkeypatch.setattr(cacheservice.os, "geteuid", lambda: 0)
    keeper = cacheservice._keeper(config_with(keep_warm=("debian-12",), warm_lanes=2), log.append)
    assert isinstance(keeper, warmkeeper.WarmKeeper) and "keeping warm: debian-12 (2 lane(s) each" in log[-1]

    woken = threading.Event()

    class OneImage:
        progress = None

        def resolve(self, ref):
            return type("Resolved", (), {"entry": entry("tiny", "e"), "paths": {"disk": tmp_path / "d"}})()
    server = cacheservice.CacheServer(tmp_path / "s.sock", OneImage, log.append, woken.set)
    try:
        assert server.resolve("tiny", lambda message: None)["ok"] and woken.is_set()
    finally:
        server.server_close()

"""A hostile neighbour on a shared worker cannot make the cache's writer run code, write through links,
or boot what it chose (issue 10). The tests run as the writer; they plant what an attacker would."""
import fcntl
import hashlib
import json
import os
import pickle
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from vmloader.bootstrapper import build, cacheindex
from vmloader.bootstrapper.cache import ImageCache
from vmloader.bootstrapper.cacheindex import CacheIndex, lock_shared
from vmloader.bootstrapper.cacheservice import CacheServer, SharedCacheReader, parse_request
from vmloader.bootstrapper.catalog import Artifact, ImageEntry, Recipe
from vmloader.bootstrapper.errors import ImageBuildError, ImageError
from vmloader.bootstrapper.repository import DirectoryRepository, HttpRepository, fetch_into_cache

DISK = b"D" * 8192
FILES = {"disk": DISK, "kernel": b"K" * 10, "initrd": b"I" * 10}
SHA = hashlib.sha256(DISK).hexdigest()
OTHER_UID = 54321


def write_repo(root: Path, name: str = "tiny", files=FILES) -> None:
    (root / name).mkdir(parents=True)
    arts = {}
    for kind, data in files.items():
        (root / name / kind).write_bytes(data)
        arts[kind] = {"url": f"{name}/{kind}", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (root / "manifest.json").write_text(json.dumps(
        {"schema_version": 1, "images": [{"name": name, "version": "1", "artifacts": arts}]}))


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "outside" / "victim"
    path.parent.mkdir()
    path.write_text("precious\n")
    return path


@pytest.fixture
def cache(tmp_path):
    write_repo(tmp_path / "repo")
    return ImageCache(tmp_path / "cache", [DirectoryRepository(tmp_path / "repo")])


class Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_crafted_pickle_row_in_an_old_index_never_runs(tmp_path, cache):
    marker = tmp_path / "ran"
    cache.resolve("tiny")
    index = cache.root / "index"
    cache.index.close()
    for child in index.iterdir():
        child.unlink()
    db = sqlite3.connect(index / "cache.db")          # diskcache's layout: the value column is a pickle
    db.execute("CREATE TABLE Cache (rowid INTEGER PRIMARY KEY, key BLOB, raw INTEGER, store_time REAL, "
               "expire_time REAL, access_time REAL, access_count INTEGER, tag BLOB, size INTEGER, mode INTEGER, "
               "filename TEXT, value BLOB)")
    db.execute("INSERT INTO Cache (key, raw, mode, value) VALUES (?, 1, 4, ?)",
               ("0" * 64, pickle.dumps(Marker(marker))))
    db.commit()
    db.close()
    again = ImageCache(cache.root, cache.repositories, max_bytes=1)
    again.resolve("tiny")
    again.evict(0)
    assert not marker.exists()
    assert not (index / "cache.db").exists()                    # discarded unread, rebuilt from the files
    assert {e.sha256 for e in again.index.entries()} <= {p.name for p in again.artifacts_dir.iterdir()}


def test_the_index_refuses_keys_that_are_not_a_sha256(tmp_path):
    index = CacheIndex(tmp_path / "index", tmp_path / "artifacts")
    for bad in ("../../etc/passwd", "A" * 64, "0" * 63, ""):
        with pytest.raises(ImageError):
            index.touch(bad, 1, "x")


def test_a_planted_part_link_is_refused_and_its_target_unchanged(cache, victim):
    cache.ensure_dirs()
    os.symlink(victim, cache.tmp_dir / f"{SHA}.part")
    with pytest.raises(ImageError) as info:
        fetch_into_cache(FakeSession(DISK), "http://x/disk", Artifact("disk", SHA, len(DISK)), cache, "disk")
    assert "symbolic link" in info.value.message
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("where", ["pins", "tmp"])
def test_a_planted_lock_or_pin_link_is_refused_and_its_target_unchanged(cache, victim, where):
    cache.ensure_dirs()
    os.symlink(victim, cache.root / where / f"{SHA}.lock")
    with pytest.raises(ImageError) as info:
        fetch_into_cache(FakeSession(DISK), "http://x/disk", Artifact("disk", SHA, len(DISK)), cache, "disk")
    assert "symbolic link" in info.value.message
    assert victim.read_text() == "precious\n" and oct(victim.stat().st_mode)[-3:] == "644"


def test_a_lock_file_owned_by_someone_else_is_refused(cache):
    cache.ensure_dirs()
    lock = cache.pins_dir / f"{SHA}.lock"
    lock.write_text("")
    os.chown(lock, OTHER_UID, OTHER_UID)
    with pytest.raises(ImageError) as info:
        cacheindex.open_lock(lock)
    assert f"uid {OTHER_UID}" in info.value.message


def test_planted_stamp_links_are_neither_written_through_nor_trusted(cache, victim, monkeypatch):
    disk = cache.resolve("tiny").disk
    sha = disk.name
    stamps = cache.stamps
    (stamps.root / sha).unlink()
    os.symlink(victim, stamps.root / sha)                        # the stamp itself: replaced, not followed
    monkeypatch.setattr(time, "monotonic_ns", lambda: 7)
    os.symlink(victim, stamps.root / f".{sha}.{os.getpid()}.7")  # its temp file: refused (O_EXCL)
    stamps.record(disk, sha)
    assert victim.read_text() == "precious\n"
    assert not stamps.unchanged(disk, sha)


def test_a_planted_saved_manifest_link_is_replaced_not_written_through(tmp_path, victim):
    repo = HttpRepository("http://127.0.0.1:9/", tmp_path / "cache")
    repo._saved().parent.mkdir(parents=True)
    os.symlink(victim, repo._saved())
    repo._save({"etag": "x", "manifest": {"schema_version": 1, "images": []}})
    assert victim.read_text() == "precious\n" and not repo._saved().is_symlink()


def test_a_saved_manifest_not_made_by_the_writer_is_ignored(tmp_path):
    repo = HttpRepository("http://127.0.0.1:9/", tmp_path / "cache")
    repo._save({"etag": "x", "manifest": {"schema_version": 1, "images": []}})
    assert repo.saved_manifest() is not None
    os.chmod(repo._saved(), 0o666)
    assert repo.saved_manifest() is None                        # others could have written it
    os.chmod(repo._saved(), 0o644)
    os.chown(repo._saved(), OTHER_UID, OTHER_UID)
    assert repo.saved_manifest() is None                        # not the writer's


def test_a_planted_rootfs_tree_is_not_reused(cache, tmp_path):
    recipe = Recipe("bookworm", ("linux-image-amd64",))
    elsewhere = tmp_path / "attacker-tree"
    elsewhere.mkdir()
    (elsewhere / ".vmloader-complete").write_text("bookworm\n")
    (cache.root / "rootfs").mkdir(parents=True)
    os.symlink(elsewhere, cache.root / "rootfs" / build.recipe_key(recipe))
    with pytest.raises(ImageBuildError) as info:
        build._debootstrap(recipe, cache, lambda m: None)
    assert "refusing to reuse" in info.value.message
    os.unlink(cache.root / "rootfs" / build.recipe_key(recipe))
    (cache.root / "rootfs" / build.recipe_key(recipe)).mkdir()
    os.chown(cache.root / "rootfs" / build.recipe_key(recipe), OTHER_UID, OTHER_UID)
    with pytest.raises(ImageBuildError):
        build._debootstrap(recipe, cache, lambda m: None)


def test_a_forged_stamp_is_not_trusted_so_a_changed_file_is_hashed_again(cache, monkeypatch):
    disk = cache.resolve("tiny").disk
    os.chmod(disk, 0o644)
    with open(disk, "r+b") as f:
        f.write(b"X")                                             # an attacker's bytes ...
    stamp = cache.stamps.root / disk.name
    stamp.write_text(json.dumps([disk.lstat().st_size, disk.lstat().st_mtime_ns, disk.lstat().st_ctime_ns,
                                 disk.lstat().st_ino]))          # ... and a stamp that matches them
    os.chown(stamp, OTHER_UID, OTHER_UID)
    hashed = []
    real = __import__("vmloader.bootstrapper.cache", fromlist=["sha256_file"]).sha256_file
    monkeypatch.setattr("vmloader.bootstrapper.cache.sha256_file", lambda p: hashed.append(p) or real(p))
    assert cache.resolve("tiny").disk.read_bytes() == DISK       # re-hashed, dropped, fetched again
    assert hashed


def test_a_part_file_changed_after_the_download_is_refused(cache, monkeypatch):
    import vmloader.bootstrapper.repository as repository
    real = repository.download

    def download_then_tamper(session, url, artifact, part, **kw):
        digest = real(session, url, artifact, part, **kw)
        fd = os.open(part, os.O_WRONLY)
        os.pwrite(fd, b"EVIL", 0)                                 # someone else's pwrite into the .part
        os.close(fd)
        return digest

    monkeypatch.setattr(repository, "download", download_then_tamper)
    with pytest.raises(ImageError) as info:
        fetch_into_cache(FakeSession(DISK), "http://x/disk", Artifact("disk", SHA, len(DISK)), cache, "disk")
    assert "sha256 mismatch" in info.value.message
    assert not (cache.artifacts_dir / SHA).exists() and not list(cache.tmp_dir.glob("*.part"))


def test_a_readers_pin_gives_up_on_an_exclusive_holder_after_a_bounded_wait(tmp_path):
    path = tmp_path / "pin"
    path.write_text("")
    with open(path) as holder, open(path) as reader:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(ImageError) as info:
            lock_shared(reader, path, wait=0.3)
    assert "exclusively" in info.value.message


def test_an_old_group_writable_cache_is_tightened_by_its_owner(cache, victim):
    cache.resolve("tiny")
    for path in (cache.root, cache.artifacts_dir, cache.pins_dir):
        os.chmod(path, 0o2775)
    os.symlink(victim, cache.pins_dir / ("f" * 64 + ".lock"))
    strangers = cache.artifacts_dir / ("e" * 64)
    strangers.write_bytes(b"x")
    os.chown(strangers, OTHER_UID, OTHER_UID)
    assert cache.tighten_legacy()
    assert oct(cache.root.stat().st_mode)[-4:] == "0755" and oct(cache.pins_dir.stat().st_mode)[-4:] == "0755"
    assert not os.path.lexists(cache.pins_dir / ("f" * 64 + ".lock")) and not strangers.exists()
    assert victim.read_text() == "precious\n"


def test_a_reader_refuses_a_cache_others_can_write(tmp_path):
    from vmloader.bootstrapper.cacheservice import _refuse_legacy
    (tmp_path / "c").mkdir()
    os.chmod(tmp_path / "c", 0o2775)
    with pytest.raises(ImageError) as info:
        _refuse_legacy(tmp_path / "c")
    assert "chmod -R go-w" in info.value.hint


@pytest.mark.parametrize("line", [b"x" * 5000 + b"\n", b"not json\n", b'{"op": "resolve"}\n',
                                  b'{"op": "resolve", "ref": "../etc"}\n', b'{"op": "rm", "ref": "a"}\n',
                                  b'{"op": "resolve", "ref": "a", "url": "http://evil"}\n'])
def test_the_service_refuses_malformed_requests(line):
    with pytest.raises(ImageError):
        parse_request(line)


def test_a_reader_resolves_through_the_service_and_its_own_image_shadows_only_for_itself(tmp_path, cache):
    sock = tmp_path / "s.sock"
    server = CacheServer(sock, lambda: ImageCache(cache.root, cache.repositories), lambda text: None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        alice = SharedCacheReader(cache.root, sock, ImageCache(tmp_path / "alice"))
        bob = SharedCacheReader(cache.root, sock, ImageCache(tmp_path / "bob"))
        shared = alice.resolve("tiny")
        assert shared.disk == cache.artifacts_dir / SHA and shared.disk.read_bytes() == DISK
        own = tmp_path / "own.qcow2"
        own.write_bytes(b"mine" * 100)
        alice.add_custom(ImageEntry(name="tiny", version="custom", boot="firmware"), {"disk": own})
        assert alice.resolve("tiny").disk.read_bytes() == b"mine" * 100
        assert bob.resolve("tiny").disk.read_bytes() == DISK      # bob still boots the shared one
        assert not (cache.root / "custom").exists()
        with alice.pin(shared), bob.pin(shared):
            removed = cache.evict(0)
        assert SHA not in {e.sha256 for e in removed}              # pinned by the readers: kept
    finally:
        server.shutdown()
        server.server_close()


def test_with_no_service_a_fully_cached_image_still_resolves_read_only(tmp_path, cache):
    cache.resolve("tiny")
    cache.record_built(cache.resolve("tiny").entry)      # a manifest the writer saved
    reader = SharedCacheReader(cache.root, tmp_path / "none.sock", ImageCache(tmp_path / "me"))
    assert reader.resolve("tiny").disk == cache.artifacts_dir / SHA
    with pytest.raises(ImageError) as info:
        reader.resolve("other")
    assert "vmloader cache serve" in info.value.hint and "none.sock" in info.value.message


def test_a_reader_lists_the_shared_caches_images_with_their_entries(tmp_path, cache):
    """What the startd probe advertises when it runs as the condor user (not the cache owner)."""
    cache.resolve("tiny")
    cache.record_built(cache.resolve("tiny").entry)
    reader = SharedCacheReader(cache.root, tmp_path / "none.sock", ImageCache(tmp_path / "me"))
    entries = reader.cached_entries()
    assert reader.cached_names() == ["tiny"] and entries["tiny"].artifacts["disk"].sha256 == SHA


class FakeResponse:
    def __init__(self, data: bytes):
        self.data, self.status_code, self.headers = data, 200, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        pass

    def iter_content(self, size):
        yield self.data


class FakeSession:
    def __init__(self, data: bytes):
        self.data = data

    def get(self, url, **kw):
        return FakeResponse(self.data)


def test_the_services_download_progress_is_shown_by_the_client(capsys):
    from vmloader.bootstrapper.cacheservice import RemoteProgress, _ProgressShown
    sent = []
    progress = RemoteProgress("debian-12 disk.qcow2", 1000, sent.append)
    for done in (0, 500, 1000):
        progress.update(done)
    shown = _ProgressShown()
    for message in sent:
        shown(json.loads(json.dumps(message))["progress"])
    assert "debian-12 disk.qcow2: 100% (1000 of 1000 bytes)" in capsys.readouterr().err

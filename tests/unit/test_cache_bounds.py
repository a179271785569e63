"""The bounded cache: LRU eviction, pins that hold across processes, a self-healing index."""
import hashlib
import json
import subprocess
import sys
import time

import pytest

from vmloader.bootstrapper.cache import ImageCache
from vmloader.bootstrapper.errors import ImageError
from vmloader.bootstrapper.repository import DirectoryRepository

SIZE = 1000


def make_repo(root, names):
    images = []
    for name in names:
        arts = {}
        for kind in ("disk", "kernel", "initrd"):
            data = f"{name}-{kind}".encode().ljust(SIZE, b".")
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / kind).write_bytes(data)
            arts[kind] = {"url": f"{name}/{kind}", "sha256": hashlib.sha256(data).hexdigest(), "size": SIZE}
        images.append({"name": name, "version": "1", "artifacts": arts})
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "images": images}))


@pytest.fixture
def repo(tmp_path):
    make_repo(tmp_path / "repo", ["a", "b", "c", "d"])
    return DirectoryRepository(tmp_path / "repo")


def cached_images(cache):
    return sorted({e.image.partition("@")[0] for e in cache.index.entries()})


def test_the_least_recently_used_image_is_evicted_when_the_bound_is_exceeded(tmp_path, repo):
    cache = ImageCache(tmp_path / "cache", [repo], max_bytes=2 * 3 * SIZE)
    for name in ("a", "b"):
        cache.resolve(name)
        time.sleep(0.01)
    cache.resolve("a")                       # a is now more recent than b
    cache.resolve("c")
    assert cached_images(cache) == ["a", "c"]
    assert not cache.has_all(repo.manifest().find("b"))


PIN_HOLDER = """
import sys, time
from pathlib import Path
from vmloader.bootstrapper.cache import ImageCache
from vmloader.bootstrapper.repository import DirectoryRepository
cache = ImageCache(Path(sys.argv[1]), [DirectoryRepository(Path(sys.argv[2]))])
with cache.pin(cache.resolve("a")):
    print("pinned", flush=True)
    sys.stdin.read()
"""


def test_an_image_pinned_by_another_process_survives_eviction_and_rm(tmp_path, repo):
    cache = ImageCache(tmp_path / "cache", [repo], max_bytes=2 * 3 * SIZE)
    holder = subprocess.Popen([sys.executable, "-c", PIN_HOLDER, str(cache.root), str(repo.root)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "pinned"
        for name in ("b", "c", "d"):
            time.sleep(0.01)
            cache.resolve(name)
        assert "a" in cached_images(cache)
        with pytest.raises(ImageError, match="in use by a running job"):
            cache.remove_image("a")
    finally:
        holder.communicate("")
    assert [e.image for e in cache.evict(0)][0].startswith("a@")   # unpinned now: oldest goes first
    assert cached_images(cache) == []


def test_rm_removes_an_unpinned_image(tmp_path, repo):
    cache = ImageCache(tmp_path / "cache", [repo])
    cache.resolve("a")
    assert len(cache.remove_image("a")) == 3
    assert not cache.has_all(repo.manifest().find("a"))
    with pytest.raises(ImageError, match="nothing in the cache"):
        cache.remove_image("a")


def test_a_corrupted_index_is_rebuilt_from_the_files(tmp_path, repo):
    cache = ImageCache(tmp_path / "cache", [repo])
    cache.resolve("a")
    cache.index.close()
    for path in (tmp_path / "cache" / "index").glob("cache.db*"):
        path.write_bytes(b"this is not sqlite" * 100)
    fresh = ImageCache(tmp_path / "cache", [repo])
    assert len(fresh.index.entries()) == 3
    assert fresh.resolve("a").disk.exists()

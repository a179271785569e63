"""A cached artifact changed after it was verified is hashed again, and dropped when damaged."""
import hashlib
import json

import pytest

from vmloader.bootstrapper.cache import ImageCache
from vmloader.bootstrapper.errors import ImageError
from vmloader.bootstrapper.repository import DirectoryRepository


def write_repo(root, files):
    (root / "tiny").mkdir(parents=True)
    for kind, data in files.items():
        (root / "tiny" / kind).write_bytes(data)
    artifacts = {kind: {"url": f"tiny/{kind}", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                 for kind, data in files.items()}
    (root / "manifest.json").write_text(json.dumps(
        {"schema_version": 1, "images": [{"name": "tiny", "version": "1", "artifacts": artifacts}]}))

FILES = {"disk": b"D" * 4096, "kernel": b"K", "initrd": b"I"}


def flip_a_byte(path) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))


def cache_with_repo(tmp_path) -> ImageCache:
    write_repo(tmp_path / "repo", FILES)
    return ImageCache(tmp_path / "cache", [DirectoryRepository(tmp_path / "repo")])


def test_an_unchanged_artifact_is_not_hashed_again(tmp_path, monkeypatch):
    cache = cache_with_repo(tmp_path)
    cache.resolve("tiny")
    calls = []
    monkeypatch.setattr("vmloader.bootstrapper.cache.sha256_file", lambda p: calls.append(p) or "x")
    assert cache.resolve("tiny").disk.read_bytes() == FILES["disk"]
    assert calls == []


def test_a_bit_flipped_cached_disk_is_dropped_and_fetched_again(tmp_path):
    cache = cache_with_repo(tmp_path)
    flip_a_byte(cache.resolve("tiny").disk)
    assert cache.resolve("tiny").disk.read_bytes() == FILES["disk"]


def test_a_damaged_disk_with_no_source_left_is_named_not_booted(tmp_path):
    cache = cache_with_repo(tmp_path)
    disk = cache.resolve("tiny").disk
    (tmp_path / "repo" / "tiny" / "disk").unlink()
    flip_a_byte(disk)
    with pytest.raises(ImageError) as info:
        cache.resolve("tiny")
    assert "tiny@1 disk" in info.value.message and "damaged" in info.value.message
    assert "is missing from repository" in info.value.message
    assert info.value.phase == "cache lookup"
    assert not disk.exists()


def test_a_truncated_cached_disk_is_named_when_it_cannot_be_fetched_again(tmp_path):
    cache = cache_with_repo(tmp_path)
    disk = cache.resolve("tiny").disk
    (tmp_path / "repo" / "tiny" / "disk").unlink()
    disk.chmod(0o644)
    disk.write_bytes(FILES["disk"][:100])
    with pytest.raises(ImageError, match="tiny@1 disk .* was damaged"):
        cache.resolve("tiny")

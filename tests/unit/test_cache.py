import hashlib
import json

import pytest

from vmloader.bootstrapper.cache import ImageCache
from vmloader.bootstrapper.repository import DirectoryRepository
from vmloader.bootstrapper.catalog import Artifact
from vmloader.bootstrapper.errors import ImageError


def artifact_for(data: bytes, url="x") -> Artifact:
    return Artifact(url, hashlib.sha256(data).hexdigest(), len(data))


def test_insert_verifies_and_stores_by_content(tmp_path):
    src = tmp_path / "disk"
    src.write_bytes(b"disk bytes")
    cache = ImageCache(tmp_path / "cache")
    art = artifact_for(b"disk bytes")
    path = cache.insert_file(src, art)
    assert path.name == art.sha256 and path.read_bytes() == b"disk bytes"
    assert cache.has(art)
    assert oct(path.stat().st_mode & 0o777) == "0o444"


def test_a_file_whose_bytes_differ_is_refused_naming_both_hashes(tmp_path):
    src = tmp_path / "disk"
    src.write_bytes(b"tampered")
    cache = ImageCache(tmp_path / "cache")
    art = artifact_for(b"original")
    with pytest.raises(ImageError) as info:
        cache.insert_file(src, art)
    assert art.sha256 in info.value.message
    assert hashlib.sha256(b"tampered").hexdigest() in info.value.message
    assert not cache.has(art)
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def write_repo(root, files):
    images = [{"name": "tiny", "version": "1",
               "artifacts": {kind: {"url": f"tiny/{kind}", "sha256": hashlib.sha256(data).hexdigest(),
                                    "size": len(data)} for kind, data in files.items()}}]
    for kind, data in files.items():
        (root / "tiny").mkdir(parents=True, exist_ok=True)
        (root / "tiny" / kind).write_bytes(data)
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "images": images}))


def test_resolve_pulls_from_a_directory_repository_into_the_cache(tmp_path):
    repo = tmp_path / "repo"
    write_repo(repo, {"disk": b"D", "kernel": b"K", "initrd": b"I"})
    cache = ImageCache(tmp_path / "cache", [DirectoryRepository(repo)])
    resolved = cache.resolve("tiny")
    assert resolved.disk.read_bytes() == b"D"
    assert resolved.kernel.parent == cache.artifacts_dir
    (repo / "tiny" / "disk").unlink()       # cached: the repository is no longer needed
    assert cache.resolve("tiny@1").disk.read_bytes() == b"D"


def test_unknown_image_lists_the_known_ones(tmp_path):
    repo = tmp_path / "repo"
    write_repo(repo, {"disk": b"D", "kernel": b"K", "initrd": b"I"})
    cache = ImageCache(tmp_path / "cache", [DirectoryRepository(repo)])
    with pytest.raises(ImageError) as info:
        cache.resolve("centos-5")
    assert "centos-5" in info.value.message
    assert "tiny" in info.value.message and "debian-12" in info.value.message


def test_a_recipe_only_image_says_how_to_build_it(tmp_path):
    cache = ImageCache(tmp_path / "cache")
    with pytest.raises(ImageError) as info:
        cache.resolve("debian-12")
    assert "vmloader images build debian-12" in info.value.hint


def test_a_mirror_missing_the_file_fails_over_to_the_next(tmp_path):
    broken, good = tmp_path / "broken", tmp_path / "good"
    files = {"disk": b"D", "kernel": b"K", "initrd": b"I"}
    write_repo(broken, files)
    (broken / "tiny" / "disk").unlink()
    write_repo(good, files)
    cache = ImageCache(tmp_path / "cache", [DirectoryRepository(broken), DirectoryRepository(good)])
    assert cache.resolve("tiny").disk.read_bytes() == b"D"


def test_verify_all_removes_an_artifact_whose_bytes_changed(tmp_path):
    repo = tmp_path / "repo"
    write_repo(repo, {"disk": b"D", "kernel": b"K", "initrd": b"I"})
    cache = ImageCache(tmp_path / "cache", [DirectoryRepository(repo)])
    disk = cache.resolve("tiny").disk
    disk.chmod(0o644)
    disk.write_bytes(b"bit rot")
    assert cache.verify_all() == [disk.name]
    assert cache.resolve("tiny").disk.read_bytes() == b"D"       # fetched again, verified


def test_an_unusable_cache_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = ImageCache(blocker / "cache")
    with pytest.raises(ImageError) as info:
        cache.insert_file(blocker, artifact_for(b"not a directory"))
    assert "not usable" in info.value.message and "VMLOADER_CACHE_DIR" in info.value.hint

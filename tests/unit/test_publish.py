"""`images publish`: a stock image added here (its boot mode, its disk alone) carried into a
repository's manifest, the manifest conforming to the schema, and pulled back by another cache."""
import json

import pytest

from vmloader.bootstrapper import publish
from vmloader.bootstrapper.cache import ImageCache
from vmloader.bootstrapper.catalog import EMBEDDED_MANIFEST, ImageEntry, parse_manifest
from vmloader.bootstrapper.errors import ImageError
from vmloader.bootstrapper.repository import DirectoryRepository

SCHEMA = EMBEDDED_MANIFEST.with_name("manifest.schema.json")
SHA = "b" * 64


def _added(tmp_path, boot="uefi") -> ImageCache:
    disk = tmp_path / "cloud.qcow2"
    disk.write_bytes(b"a stock disk")
    cache = ImageCache(tmp_path / "cache")
    cache.add_custom(ImageEntry(name="stock-trixie", version="custom", boot=boot), {"disk": disk})
    return cache


def test_a_stock_image_is_published_with_its_boot_mode_and_pulled_back_by_another_cache(tmp_path):
    repo = tmp_path / "repo"
    published = publish.publish(_added(tmp_path), repo, ["stock-trixie"])
    assert [(e.ref, e.boot, sorted(e.artifacts)) for e in published] == [("stock-trixie@custom", "uefi", ["disk"])]
    data = json.loads((repo / "manifest.json").read_text())
    assert data["images"][0]["boot"] == "uefi" and data["images"][0]["artifacts"]["disk"]["url"] == \
        "stock-trixie/custom/cloud.qcow2"
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(data, json.loads(SCHEMA.read_text()))

    other = ImageCache(tmp_path / "other", [DirectoryRepository(repo)])
    pulled = other.resolve("stock-trixie")
    assert (pulled.entry.boot, pulled.entry.firmware, pulled.kernel, pulled.initrd) == ("uefi", "uefi", None, None)
    assert pulled.disk.read_bytes() == b"a stock disk"


def test_added_images_are_published_only_by_name(tmp_path):
    cache = _added(tmp_path, boot="bios")
    with pytest.raises(ImageError, match="nothing built or added here to publish: no images"):
        publish.publish(cache, tmp_path / "repo")
    with pytest.raises(ImageError, match="not-here"):
        publish.publish(cache, tmp_path / "repo", ["stock-trixie", "not-here"])
    assert not (tmp_path / "repo" / "manifest.json").exists()


def test_an_added_image_whose_disk_left_the_cache_is_not_published(tmp_path):
    cache = _added(tmp_path)
    for artifact in cache.artifacts_dir.iterdir():
        artifact.unlink()
    with pytest.raises(ImageError, match="not complete in the cache"):
        publish.publish(cache, tmp_path / "repo", ["stock-trixie"])


def _firmware_image_with_a_kernel(boot: str) -> dict:
    art = {"url": "x", "sha256": SHA, "size": 1}
    return {"schema_version": 1, "images": [{"name": "stock", "version": "1", "boot": boot,
                                             "artifacts": {"disk": art, "kernel": art, "initrd": art}}]}


@pytest.mark.parametrize("boot", ["bios", "uefi", "firmware"])
def test_a_manifest_giving_a_firmware_booted_image_a_kernel_is_refused_by_parser_and_schema(boot):
    bad = _firmware_image_with_a_kernel(boot)
    with pytest.raises(ImageError, match=r"\$\.images\[0\]\.artifacts.*no kernel or initrd"):
        parse_manifest(bad, "m.json")
    jsonschema = pytest.importorskip("jsonschema")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads(SCHEMA.read_text()))
    good = _firmware_image_with_a_kernel("direct-kernel")
    jsonschema.validate(good, json.loads(SCHEMA.read_text()))
    assert parse_manifest(good).images[0].fetchable

import json

import pytest

from vmloader.bootstrapper.catalog import EMBEDDED_MANIFEST, ImageEntry, Manifest, load_manifest, parse_manifest
from vmloader.bootstrapper.errors import ImageError

SHA = "a" * 64


def entry(version, artifacts=True, name="debian-12"):
    data = {"name": name, "version": version, "os": {"family": "debian", "release": "12"}}
    if artifacts:
        data["artifacts"] = {k: {"url": f"{name}/{k}", "sha256": SHA, "size": 10}
                             for k in ("disk", "kernel", "initrd")}
    return data


def test_embedded_manifest_has_a_buildable_debian_12():
    manifest = load_manifest(EMBEDDED_MANIFEST)
    image = manifest.find("debian-12")
    assert image is not None and image.buildable
    assert image.recipe.suite == "bookworm"
    assert "python3-minimal" in image.recipe.packages


def test_find_by_name_picks_the_newest_fetchable_version():
    manifest = parse_manifest({"schema_version": 1,
                               "images": [entry("12.1"), entry("12.3"), entry("12.9", artifacts=False)]})
    assert manifest.find("debian-12", need_artifacts=True).version == "12.3"
    assert manifest.find("debian-12@12.1").version == "12.1"
    assert manifest.find("debian-12@12.7") is None
    assert manifest.find("debian-11") is None


def test_round_trip_through_to_dict_keeps_every_field():
    manifest = parse_manifest({"schema_version": 1, "images": [entry("12.1")]})
    again = parse_manifest(json.loads(json.dumps(manifest.to_dict())))
    assert again.images == manifest.images


@pytest.mark.parametrize("data, where", [
    ([], "$"),
    ({"schema_version": 2, "images": []}, "$.schema_version"),
    ({"schema_version": 1, "images": {}}, "$.images"),
    ({"schema_version": 1, "images": [{"name": "x"}]}, "$.images[0].version"),
    ({"schema_version": 1, "images": [dict(entry("1"), artifacts={"disk": {"url": "d", "sha256": "XYZ", "size": 1}})]},
     "$.images[0].artifacts.disk.sha256"),
    ({"schema_version": 1, "images": [dict(entry("1"), artifacts={"floppy": {}})]}, "$.images[0].artifacts.floppy"),
])
def test_malformed_manifest_errors_name_the_json_path(data, where):
    with pytest.raises(ImageError) as info:
        parse_manifest(data, "m.json")
    assert where in info.value.message
    assert "m.json" in info.value.message


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text('{"schema_version": 1,\n "images": [,]}')
    with pytest.raises(ImageError) as info:
        load_manifest(path)
    assert "line 2" in info.value.message


SCHEMA = EMBEDDED_MANIFEST.with_name("manifest.schema.json")


def test_the_embedded_manifest_and_a_built_one_conform_to_the_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(json.loads(EMBEDDED_MANIFEST.read_text()), schema)
    built = parse_manifest({"schema_version": 1, "images": [entry("12.1")]}).to_dict()
    jsonschema.validate(built, schema)


def test_what_the_schema_rejects_the_parser_rejects_too():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    bad = {"schema_version": 1, "images": [dict(entry("1"), artifacts={"disk": {"url": "d", "sha256": "XYZ", "size": 1}})]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(ImageError):
        parse_manifest(bad)


def test_newest_version_is_by_release_number_then_by_publication_order():
    def entry(version):
        return ImageEntry(name="debian-12", version=version)
    manifest = Manifest((entry("12.10"), entry("12.9"), entry("12.bc9f"), entry("12.b2ec")))
    assert manifest.find("debian-12").version == "12.10"
    rebuilt = Manifest((entry("12.bc9f"), entry("12.b2ec")))     # the later build was published last
    assert rebuilt.find("debian-12").version == "12.b2ec"

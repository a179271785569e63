import json

from vmloader.bootstrapper import cli
from vmloader.bootstrapper.catalog import EMBEDDED_MANIFEST


def test_validate_accepts_the_embedded_manifest(capsys):
    assert cli.main(["images", "validate", str(EMBEDDED_MANIFEST)]) == 0
    assert "valid" in capsys.readouterr().out


def test_validate_names_the_json_path_of_the_problem(tmp_path, capsys):
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps({"schema_version": 1, "images": [{"name": "x", "version": "1",
                                                                 "artifacts": {"disk": {"url": "d"}}}]}))
    assert cli.main(["images", "validate", str(bad)]) == 125
    err = capsys.readouterr().err
    assert "$.images[0].artifacts.disk.sha256" in err and "hint:" in err


def test_validate_of_a_missing_file_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["images", "validate", str(tmp_path / "nope.json")]) == 125
    assert "no manifest at" in capsys.readouterr().err


def test_a_bad_bind_address_for_repo_serve_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["repo", "serve", str(tmp_path), "--bind", "localhost"]) == 125
    assert "HOST:PORT" in capsys.readouterr().err


def test_snapshot_connect_takes_id_and_port_or_a_socket(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VMLOADER_STATE_DIR", str(tmp_path / "state"))
    assert cli.main(["snapshot", "connect", "some-id"]) == 125
    assert "ID PORT, or --socket PATH" in capsys.readouterr().err
    assert cli.main(["snapshot", "connect", "--socket", str(tmp_path / "guest-22.sock")]) == 125
    err = capsys.readouterr().err
    assert "no booted snapshot listens there" in err and "snapshot boot ID --forward PORT" in err

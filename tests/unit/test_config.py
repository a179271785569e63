from pathlib import Path

import pytest

from vmloader.bootstrapper import config
from vmloader.bootstrapper.errors import ConfigError


def test_environment_overrides_file_and_flags_override_environment(tmp_path):
    conf = tmp_path / "config.toml"
    conf.write_text('cache_dir = "/srv/cache"\nmemory_mib = 2048\nsnapshot_policy = "always"\n')
    cfg = config.load(environ={"VMLOADER_MEMORY": "512"}, files=[conf])
    assert cfg.cache_dir == Path("/srv/cache")
    assert cfg.memory_mib == 512
    assert cfg.snapshot_policy == "always"
    cfg = config.load(overrides={"memory_mib": 4096}, environ={"VMLOADER_MEMORY": "512"}, files=[conf])
    assert cfg.memory_mib == 4096


def test_repositories_accept_a_space_separated_environment_value():
    cfg = config.load(environ={"VMLOADER_REPOSITORY": "/a https://mirror/b"}, files=[])
    assert cfg.repositories == ("/a", "https://mirror/b")


def test_unknown_setting_in_a_file_is_named(tmp_path):
    conf = tmp_path / "config.toml"
    conf.write_text("cache_dri = '/x'\n")
    with pytest.raises(ConfigError, match="cache_dri"):
        config.load(environ={}, files=[conf])


def test_bad_values_say_which_setting_and_where(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(environ={"VMLOADER_SNAPSHOT": "sometimes"}, files=[])
    assert "snapshot_policy" in info.value.message and "VMLOADER_SNAPSHOT" in info.value.message


def test_on_failure_policy_accepts_the_condor_spelling():
    assert config.load(environ={"VMLOADER_SNAPSHOT": "on_failure"}, files=[]).snapshot_policy == "on-failure"


def test_a_broken_toml_file_is_a_config_error(tmp_path):
    conf = tmp_path / "config.toml"
    conf.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match=str(conf)):
        config.load(environ={}, files=[conf])


def test_host_credentials_go_into_no_guest_by_default(tmp_path):
    from vmloader.bootstrapper.job import host_credentials
    cert, key = tmp_path / "hostcert.pem", tmp_path / "hostkey.pem"
    cert.write_text("cert")
    key.write_text("key")
    conf = tmp_path / "config.toml"
    conf.write_text(f'host_cert = "{cert}"\nhost_key = "{key}"\n')
    cfg = config.load(environ={}, files=[conf], admin_files=[conf])
    assert cfg.host_cert_images == () and cfg.host_cert_users == ()
    assert host_credentials(cfg, "debian-12", "alice") == []


def test_host_credentials_go_into_the_images_and_users_the_worker_names(tmp_path):
    from vmloader.bootstrapper.job import host_credentials
    cert, key = tmp_path / "hostcert.pem", tmp_path / "hostkey.pem"
    cert.write_text("cert")
    key.write_text("key")
    conf = tmp_path / "config.toml"
    conf.write_text(f'host_cert = "{cert}"\nhost_key = "{key}"\n'
                    'host_cert_images = ["debian-12"]\nhost_cert_users = ["alice"]\n')
    cfg = config.load(environ={}, files=[conf], admin_files=[conf])
    wanted = ["/etc/grid-security/hostcert.pem", "/etc/grid-security/hostkey.pem"]
    assert [f.guest_path for f in host_credentials(cfg, "debian-12", "bob")] == wanted
    assert [f.guest_path for f in host_credentials(cfg, "debian-11", "alice")] == wanted
    assert host_credentials(cfg, "debian-11", "bob") == []
    assert [f.mode for f in host_credentials(cfg, "debian-12", "bob")] == [0o644, 0o600]


def test_only_the_workers_own_config_may_turn_host_credentials_on(tmp_path):
    system, user = tmp_path / "system.toml", tmp_path / "user.toml"
    system.write_text('host_cert_users = []\n')
    user.write_text('host_cert_users = ["mallory"]\n')
    with pytest.raises(ConfigError) as info:
        config.load(environ={}, files=[system, user], admin_files=[system])
    assert "host_cert_users may be set only in the worker's config" in info.value.message
    assert str(user) in info.value.message
    # No environment variable turns it on either (a job's environment is the submitter's).
    cfg = config.load(environ={"VMLOADER_HOST_CERT_USERS": "mallory", "": "x"}, files=[system],
                      admin_files=[system])
    assert cfg.host_cert_users == ()


def test_the_stock_boot_grace_defaults_to_30_s_and_is_set_like_any_setting(tmp_path):
    assert config.load(environ={}, files=[]).stock_boot_grace == 30
    assert config.load(environ={"VMLOADER_STOCK_BOOT_GRACE": "8"}, files=[]).stock_boot_grace == 8
    with pytest.raises(ConfigError, match="stock_boot_grace"):
        config.load(environ={"VMLOADER_STOCK_BOOT_GRACE": "0"}, files=[])

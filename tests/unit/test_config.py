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

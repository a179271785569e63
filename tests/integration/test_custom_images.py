"""Custom images: a user's own qcow2 (plus kernel and initrd) registered without a repository."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from vmloader.bootstrapper import config
from vmloader.bootstrapper.cache import ImageCache

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]


@pytest.fixture
def own_cache():
    path = Path(tempfile.mkdtemp(prefix="vmloader-custom-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_registered_custom_image_boots_and_runs_a_job(vmloader, built_image, own_cache, tmp_path):
    cache = ImageCache(config.load().cache_dir)
    files = {kind: tmp_path / kind for kind in ("disk", "kernel", "initrd")}
    for kind, path in files.items():
        shutil.copyfile(cache.artifact_path(built_image.artifacts[kind]), path)
    env = {"VMLOADER_CACHE_DIR": str(own_cache)}
    added = vmloader("images", "add", "my-debian", "--disk", str(files["disk"]), "--kernel", str(files["kernel"]),
                     "--initrd", str(files["initrd"]), "--cmdline", built_image.cmdline, env_extra=env)
    assert added.returncode == 0, added.err
    assert "my-debian@custom" in added.out
    run = vmloader("run", "--image", "my-debian", "--snapshot", "never", "--", "cat", "/etc/debian_version",
                   env_extra=env)
    assert run.returncode == 0, run.err
    assert run.out.startswith("12.")


def test_a_raw_disk_is_taken_as_a_qcow2_of_it_and_refused_only_for_having_no_boot_loader(vmloader, own_cache,
                                                                                          tmp_path):
    raw = tmp_path / "disk.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "16M"], check=True)
    added = vmloader("images", "add", "mine", "--disk", str(raw), env_extra={"VMLOADER_CACHE_DIR": str(own_cache)})
    assert added.returncode == 125
    assert f"--disk {raw}: no boot loader found" in added.err and "--boot bios|uefi" in added.err
    assert not list((own_cache / "tmp").iterdir())          # the conversion's scratch removed

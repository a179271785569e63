"""Bad input ends in a clear message, the right exit code, and nothing left behind."""
import json

import pytest

from vmloader.bootstrapper import config
from vmloader.bootstrapper.cache import ImageCache

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]


def test_an_unknown_image_lists_the_known_ones(vmloader):
    run = vmloader("run", "--image", "centos-5", "--", "true")
    assert run.returncode == 125
    assert "unknown image 'centos-5'" in run.err and "debian-12" in run.err
    assert "[cache lookup]" in run.err


def test_an_output_path_escaping_the_work_dir_is_refused_before_boot(vmloader, state_dir):
    run = vmloader("run", "--image", "debian-12", "--output", "../../etc/shadow", "--", "true")
    assert run.returncode == 125
    assert "escapes the job's work dir" in run.err
    assert not (state_dir / "jobs").exists()


def test_an_unreachable_libvirt_daemon_says_how_to_start_it(vmloader, tmp_path):
    uri = f"qemu+unix:///system?socket={tmp_path}/no-such-libvirt-sock"
    run = vmloader("run", "--image", "debian-12", "--", "true", env_extra={"VMLOADER_LIBVIRT_URI": uri})
    assert run.returncode == 125
    assert "libvirtd" in run.err and "[define]" in run.err


def test_a_forced_unusable_hypervisor_is_a_clear_error(vmloader):
    run = vmloader("run", "--image", "debian-12", "--hypervisor", "xen", "--", "true")
    assert run.returncode == 125
    assert "xen" in run.err.lower()


def test_a_guest_that_never_reaches_the_agent_shows_the_console_tail(vmloader, built_image, tmp_path):
    """An image whose init does not exist: the kernel panics; the error shows its last words."""
    entry = built_image.to_dict()
    cache = ImageCache(config.load().cache_dir)
    entry["name"] = "broken-init"
    entry["cmdline"] = "root=/dev/vda rw console=ttyS0 init=/no/such/init"
    for kind, art in built_image.artifacts.items():
        entry["artifacts"][kind]["url"] = str(cache.artifact_path(art))
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "manifest.json").write_text(json.dumps({"schema_version": 1, "images": [entry]}))
    run = vmloader("run", "--image", "broken-init", "--", "true",
                   env_extra={"VMLOADER_REPOSITORY": str(repo), "VMLOADER_BOOT_TIMEOUT": "45"})
    assert run.returncode == 125
    assert "never reached the agent" in run.err
    assert "[boot]" in run.err
    assert "/no/such/init" in run.err

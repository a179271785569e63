"""`vmloader images agent-kit DIR`: what a site's image build runs to carry vmloader's agent
baked in (installed into an image's root tree here; the real boot is in test_stock_delivery.py)."""
import os
import subprocess
import sys

import pytest

from vmloader.bootstrapper import agentkit
from vmloader.bootstrapper.errors import UsageError


def test_the_kit_installs_the_agent_and_enables_its_unit_in_an_image_tree(tmp_path):
    kit = tmp_path / "kit"
    assert [p.name for p in agentkit.write_kit(kit)] == list(agentkit.KIT_FILES)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    done = subprocess.run(["sh", str(kit / "install.sh"), str(root)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lib = root / "usr/lib/vmloader"
    assert oct((lib / "adopt.sh").stat().st_mode & 0o777) == "0o755"
    assert (lib / "adopt.sh").read_bytes() == (agentkit.AGENT_DIR / "adopt.sh").read_bytes()
    link = root / "etc/systemd/system/sysinit.target.wants/vmloader-adopt.service"
    assert os.readlink(link) == "/etc/systemd/system/vmloader-adopt.service"     # a link inside the image
    unit = (root / "etc/systemd/system/vmloader-adopt.service").read_text()
    assert "ExecStart=/bin/sh /usr/lib/vmloader/adopt.sh /usr/lib/vmloader" in unit
    # The bundle is the agent python3 runs from (the path adopt.sh gives it).
    # (-S: not this checkout's editable install; cwd: not the checkout either)
    ran = subprocess.run([sys.executable, "-S", "-c",
                          "import vmloader.agent.server, vmloader.protocol as p; print(p.__file__)"],
                         env={"PYTHONPATH": str(lib / "vmloader-agent.zip")}, cwd=tmp_path,
                         capture_output=True, text=True)
    assert ran.returncode == 0 and "vmloader-agent.zip" in ran.stdout, ran.stderr


def test_install_refuses_a_directory_that_is_not_an_image_root_and_an_incomplete_kit(tmp_path):
    kit = tmp_path / "kit"
    agentkit.write_kit(kit)
    (tmp_path / "empty").mkdir()
    wrong = subprocess.run(["sh", str(kit / "install.sh"), str(tmp_path / "empty")], capture_output=True, text=True)
    assert wrong.returncode == 2 and "does not look like an image's root" in wrong.stderr
    (kit / "vmloader-agent.zip").unlink()
    (tmp_path / "empty" / "etc").mkdir()
    partial = subprocess.run(["sh", str(kit / "install.sh"), str(tmp_path / "empty")], capture_output=True, text=True)
    assert partial.returncode == 2 and "vmloader-agent.zip is missing" in partial.stderr
    assert not (tmp_path / "empty" / "usr").exists()


def test_the_kit_is_written_over_an_older_one_but_never_through_a_link(tmp_path):
    kit = tmp_path / "kit"
    kit.mkdir()
    target = tmp_path / "elsewhere"
    target.write_text("keep me")
    (kit / "adopt.sh").symlink_to(target)
    agentkit.write_kit(kit)
    assert target.read_text() == "keep me" and not (kit / "adopt.sh").is_symlink()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UsageError):
        agentkit.write_kit(tmp_path / "a-file")

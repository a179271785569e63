"""HTCondor runs jobs as the submitting user: vmloader must work without root (qemu:///session)."""
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import vmloader
from vmloader.bootstrapper import config

pytestmark = pytest.mark.integration
USER = "vmloader-test"
REPO = Path(vmloader.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unprivileged_user():
    if os.geteuid() != 0:
        pytest.skip("creating a test user needs root")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", USER], check=True)
    return pwd.getpwnam(USER)


@pytest.fixture
def readable_checkout(unprivileged_user):
    """A copy of the package the test user can read (the clone may sit under /root)."""
    root = Path(tempfile.mkdtemp(prefix="vmloader-user-", dir="/var/tmp"))
    for name in ("vmloader", "images"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_an_unprivileged_user_runs_a_job_through_the_session_daemon(unprivileged_user, readable_checkout,
                                                                    built_image):
    runtime = Path(f"/tmp/vmloader-test-xdg-{unprivileged_user.pw_uid}")
    runtime.mkdir(mode=0o700, exist_ok=True)
    os.chown(runtime, unprivileged_user.pw_uid, unprivileged_user.pw_gid)
    env = ["env", "-i", f"HOME={unprivileged_user.pw_dir}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
           f"XDG_RUNTIME_DIR={runtime}", f"VMLOADER_CACHE_DIR={config.load().cache_dir}",
           f"PYTHONPATH={readable_checkout}"]
    cli = ["/usr/bin/python3", "-m", "vmloader.bootstrapper.cli"]
    run = subprocess.run(["runuser", "-u", USER, "--", *env, *cli, "run", "--image", "debian-12",
                          "--json", "--snapshot", "always", "--", "id", "-u"],
                         capture_output=True, text=True, timeout=600, cwd="/tmp")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert Path(result["stdout_path"]).read_text().strip() == "1000"
    assert result["job_dir"].startswith(unprivileged_user.pw_dir)
    snapshot = Path(unprivileged_user.pw_dir) / ".local/share/vmloader/snapshots" / result["snapshot"]
    assert snapshot.stat().st_uid == unprivileged_user.pw_uid
    listed = subprocess.run(["runuser", "-u", USER, "--", *env, *cli, "snapshot", "rm", result["snapshot"]],
                            capture_output=True, text=True, cwd="/tmp")
    assert listed.returncode == 0, listed.stderr

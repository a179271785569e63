"""HTCondor runs jobs as the submitting user: vmloader must work without root (qemu:///session)."""
import json
from pathlib import Path

import pytest

from vmloader.bootstrapper import config

from .conftest import as_user, ensure_user

pytestmark = pytest.mark.integration


def test_an_unprivileged_user_runs_a_job_through_the_session_daemon(readable_checkout, built_image):
    user = ensure_user("vmloader-test")
    env = {"VMLOADER_CACHE_DIR": str(config.load().cache_dir)}
    proc = as_user(user, readable_checkout, ["run", "--image", "debian-12", "--json", "--snapshot", "always",
                                             "--", "id", "-u"], env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert Path(result["stdout_path"]).read_text().strip() == "1000"
    assert result["job_dir"].startswith(user.pw_dir)
    snapshot = Path(user.pw_dir) / ".local/share/vmloader/snapshots" / result["snapshot"]
    assert snapshot.stat().st_uid == user.pw_uid
    # Another user sees none of it, with a clear message.
    other = ensure_user("vmloader-test-other")
    theirs = dict(env, VMLOADER_STATE_DIR=str(Path(user.pw_dir) / ".local/share/vmloader"))
    for args in (["snapshot", "list"], ["snapshot", "show", result["snapshot"]],
                 ["snapshot", "exec", result["snapshot"], "--", "true"], ["snapshot", "shell", result["snapshot"]],
                 ["snapshot", "boot", result["snapshot"]], ["snapshot", "logs", result["snapshot"]],
                 ["snapshot", "diff", result["snapshot"]],
                 ["snapshot", "export", result["snapshot"], "-o", "/tmp/theirs.qcow2"]):
        peek = as_user(other, readable_checkout, args, theirs)
        _, err = peek.communicate(timeout=120)
        assert peek.returncode == 125 and "belongs to another user" in err, (args, err)
    rm = as_user(user, readable_checkout, ["snapshot", "rm", result["snapshot"]], env)
    _, err = rm.communicate(timeout=60)
    assert rm.returncode == 0, err


def test_an_unprivileged_users_timed_out_job_is_frozen_and_resumed(readable_checkout, built_image):
    user = ensure_user("vmloader-test")
    env = {"VMLOADER_CACHE_DIR": str(config.load().cache_dir)}
    proc = as_user(user, readable_checkout, ["run", "--image", "debian-12", "--json", "--timeout", "15",
                                             "--", "sleep", "1000"], env)
    out, err = proc.communicate(timeout=600)
    result = json.loads(out)
    assert proc.returncode == 124 and result["outcome"] == "timeout", err
    snapshot = Path(user.pw_dir) / ".local/share/vmloader/snapshots" / result["snapshot"]
    assert (snapshot / "memory.save").stat().st_uid == user.pw_uid
    found = as_user(user, readable_checkout, ["snapshot", "exec", result["snapshot"], "--", "pgrep", "-ax", "sleep"],
                    env)
    out, err = found.communicate(timeout=600)
    assert found.returncode == 0 and "sleep 1000" in out, err
    rm = as_user(user, readable_checkout, ["snapshot", "rm", result["snapshot"]], env)
    assert rm.communicate(timeout=60) and rm.returncode == 0

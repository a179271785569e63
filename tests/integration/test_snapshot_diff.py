"""`vmloader snapshot diff`: a real job's changes, read from its kept disk without booting it,
in user space: as the snapshot's owner, or for root by parsers that dropped to nobody."""
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from vmloader.bootstrapper import config
from vmloader.bootstrapper.cache import ImageCache, sha256_file

from .conftest import as_user, ensure_user
from .faulttable import record_row

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]


def our_mounts() -> list:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if "vmloader-diff-" in line]


@pytest.fixture
def kept_job(vmloader, state_dir):
    """A job that creates a file, deletes one and appends to one; its state is kept."""
    run = vmloader("run", "--image", "debian-12", "--snapshot", "always", "--root", "--json", "--", "sh", "-c",
                   "echo hi > /work/created; rm /etc/issue.net; echo x >> /etc/motd")
    result = run.json()
    assert result["exit_status"] == 0 and result["snapshot"], run.err
    return state_dir / "snapshots" / result["snapshot"]


def test_diff_lists_what_the_job_created_deleted_and_changed_and_writes_nothing(vmloader, kept_job):
    base = Path(json.loads((kept_job / "metadata.json").read_text())["base_path"])
    before = sha256_file(kept_job / "disk.qcow2"), sha256_file(base)
    run = vmloader("snapshot", "diff", kept_job.name, "--json")
    assert run.returncode == 0, run.err
    diff = run.json()
    assert diff["added"] == [{"path": "/work/created", "type": "file", "size": 3}]
    assert [(c["path"], c["type"]) for c in diff["removed"]] == [("/etc/issue.net", "file")]
    assert diff["removed"][0]["size"] > 0                  # the base's size: "Debian GNU/Linux 12\n"
    changed = {c["path"]: c for c in diff["changed"]}
    assert set(changed) == {"/etc/motd"}                   # /etc/hostname & agent bytecode: boot noise
    assert changed["/etc/motd"]["size"] == changed["/etc/motd"]["old_size"] + 2
    text = vmloader("snapshot", "diff", kept_job.name)
    assert text.out.splitlines() == ["D /etc/issue.net", "C /etc/motd", "A /work/created"]
    everything = vmloader("snapshot", "diff", kept_job.name, "--all", "--json").json()
    assert "/etc/hostname" in {c["path"] for c in everything["changed"]}
    assert (sha256_file(kept_job / "disk.qcow2"), sha256_file(base)) == before
    assert our_mounts() == []


def copy_of(snapshot: Path, new_id: str) -> Path:
    copy = snapshot.with_name(new_id)
    shutil.copytree(snapshot, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    (copy / "metadata.json").write_text(json.dumps(dict(meta, id=new_id)))
    return copy


def test_bad_input_gets_a_clear_message_and_nothing_is_deleted(vmloader, kept_job):
    unknown = vmloader("snapshot", "diff", "no-such-id")
    assert unknown.returncode == 125 and "no snapshot with id 'no-such-id'" in unknown.err

    damaged = copy_of(kept_job, "damaged")
    with open(damaged / "disk.qcow2", "r+b") as disk:
        disk.truncate(300_000)                             # header intact, clusters gone
    digest = sha256_file(damaged / "disk.qcow2")
    run = vmloader("snapshot", "diff", "damaged", "--json")
    assert run.returncode == 125 and "the disk of snapshot damaged is damaged" in run.err, run.err
    assert json.loads(run.stdout)["error"] == "SnapshotError"
    assert sha256_file(damaged / "disk.qcow2") == digest

    evicted = copy_of(kept_job, "evicted")
    meta = json.loads((evicted / "metadata.json").read_text())
    (evicted / "metadata.json").write_text(json.dumps(dict(meta, base_path=str(evicted / "no-base.qcow2"))))
    run = vmloader("snapshot", "diff", "evicted")
    assert run.returncode == 125 and "base image of snapshot evicted" in run.err, run.err
    assert "hint: pull debian-12" in run.err

    listed = {s["id"] for s in vmloader("snapshot", "list", "--json").json()}
    assert listed == {kept_job.name, "damaged", "evicted"}
    for snap in (kept_job, damaged, evicted):
        assert {"disk.qcow2", "metadata.json"} <= {p.name for p in snap.iterdir()}
    assert our_mounts() == []


PARSERS = ("qemu-img", "e2fsck", "debugfs")
EVIL = "/work/evil\nD issue.net\x1b[2Jx"      # a name that would forge a line and clear the screen


def spies(tmp: Path) -> dict:
    """A directory of stand-ins for the parsers that note the uid they run as, then exec the real one."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name in PARSERS:
        log = tmp / f"{name}.uids"
        log.touch()
        log.chmod(0o666)
        real = shutil.which(name)
        (bin_dir / name).write_text(f'#!/bin/sh\nid -u >> {log}\nexec {real} "$@"\n')
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_roots_diff_runs_its_parsers_as_nobody_and_escapes_guest_names(vmloader, state_dir):
    run = vmloader("run", "--image", "debian-12", "--snapshot", "always", "--root", "--json", "--", "sh", "-c",
                   "touch \"/work/evil$(printf '\\nD issue.net\\033[2Jx')\"")
    result = run.json()
    assert result["exit_status"] == 0 and result["snapshot"], run.err
    tmp = Path(tempfile.mkdtemp(prefix="vmloader-spy-", dir="/tmp"))
    tmp.chmod(0o755)
    try:
        env = spies(tmp)
        diff = vmloader("snapshot", "diff", result["snapshot"], "--json", env_extra=env)
        assert diff.returncode == 0, diff.err
        assert {c["path"] for c in diff.json()["added"]} == {EVIL}
        text = vmloader("snapshot", "diff", result["snapshot"], env_extra=env)
        assert text.returncode == 0, text.err
        assert text.out.splitlines() == ["A /work/evil\\nD issue.net\\x1b[2Jx"]
        uids = {name: set((tmp / f"{name}.uids").read_text().split()) for name in PARSERS}
    finally:
        shutil.rmtree(tmp)
    nobody = str(pwd.getpwnam("nobody").pw_uid)
    assert uids == {name: {nobody} for name in PARSERS}, uids      # each ran, and never as root
    record_row("snapshot diff of a guest disk: parsers run without root", 0, "diffed", "snapshot diff",
               f"qemu-img, e2fsck and debugfs ran as uid {nobody} (nobody) only; a guest file name with "
               "newline and ESC shown escaped", "snapshot (only read)")


def test_a_normal_user_diffs_their_own_snapshot_without_root(readable_checkout, built_image):
    user = ensure_user("vmlt-diff-a")
    env = {"VMLOADER_CACHE_DIR": str(config.load().cache_dir)}
    job = as_user(user, readable_checkout, ["run", "--image", "debian-12", "--json", "--snapshot", "always",
                                            "--", "sh", "-c", "echo hi > /work/mine"], env)
    out, err = job.communicate(timeout=900)
    assert job.returncode == 0, err
    snapshot = json.loads(out)["snapshot"]
    try:
        diff = as_user(user, readable_checkout, ["--debug", "snapshot", "diff", snapshot, "--json"], env)
        out, err = diff.communicate(timeout=600)
        assert diff.returncode == 0, err
        assert json.loads(out)["added"] == [{"path": "/work/mine", "type": "file", "size": 3}]
        assert f"parsers ran as uid {user.pw_uid}\n" in err
        assert not [line for line in Path("/proc/mounts").read_text().splitlines() if "vmloader-diff-" in line]
    finally:
        rm = as_user(user, readable_checkout, ["snapshot", "rm", snapshot], env)
        rm.communicate(timeout=60)


XFS_DISK = """set -e
cd "$1"
mkdir ext xfs
mount -o loop,ro ext.raw ext
mount -o loop xfs.raw xfs
cp -a ext/. xfs/
cp ext/boot/initrd.img-* initrd
umount xfs ext
"""


def xfs_copy_of(built_image, work: Path) -> dict:
    """The built image's tree on an XFS disk, with the distribution's initrd (ours loads ext4 only):
    disk, kernel and initrd files for `images add`. Root makes it, in a mount namespace of its own."""
    cache = ImageCache(config.load().cache_dir)
    disk = cache.artifact_path(built_image.artifacts["disk"])
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(work / "ext.raw")], check=True)
    with open(work / "xfs.raw", "wb") as raw:
        raw.truncate((work / "ext.raw").stat().st_size)
    subprocess.run(["mkfs.xfs", "-q", str(work / "xfs.raw")], check=True)
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", XFS_DISK, "sh", str(work)],
                   check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(work / "xfs.raw"), str(work / "disk.qcow2")],
                   check=True)
    for name in ("ext.raw", "xfs.raw"):
        (work / name).unlink()
    shutil.copyfile(cache.artifact_path(built_image.artifacts["kernel"]), work / "kernel")
    return {"disk": work / "disk.qcow2", "kernel": work / "kernel", "initrd": work / "initrd"}


@pytest.mark.skipif(shutil.which("mkfs.xfs") is None, reason="needs xfsprogs (scripts/setup-host.sh)")
def test_a_users_snapshot_of_an_xfs_root_gets_a_message_naming_xfs_and_what_would_work(readable_checkout,
                                                                                      built_image):
    user = ensure_user("vmlt-diff-a")
    work = Path(tempfile.mkdtemp(prefix="vmloader-xfs-", dir="/var/tmp"))
    env = {"VMLOADER_CACHE_DIR": str(work / "cache"), "VMLOADER_BOOT_TIMEOUT": "600"}   # udev's initrd

    def vmloader_as_user(*args: str, timeout: float = 600) -> tuple:
        child = as_user(user, readable_checkout, list(args), env)
        out, err = child.communicate(timeout=timeout)
        return child.returncode, out, err

    snapshot = None
    try:
        files = xfs_copy_of(built_image, work)
        (work / "cache").mkdir()
        subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(work)], check=True)
        code, out, err = vmloader_as_user("images", "add", "my-xfs", "--disk", str(files["disk"]), "--kernel",
                                          str(files["kernel"]), "--initrd", str(files["initrd"]), "--cmdline",
                                          built_image.cmdline + " rootfstype=xfs")
        assert code == 0, err
        code, out, err = vmloader_as_user("run", "--image", "my-xfs", "--json", "--snapshot", "always", "--",
                                          "stat", "-f", "-c", "%T", "/", timeout=1200)
        assert code == 0, err
        result = json.loads(out)
        assert result["exit_status"] == 0 and result["snapshot"], err
        snapshot = result["snapshot"]
        assert Path(result["stdout_path"]).read_text() == "xfs\n"          # the guest ran on XFS
        code, out, err = vmloader_as_user("snapshot", "diff", snapshot)
        assert code == 125, err
        assert "holds an XFS file system" in err and "reads ext2, ext3 and ext4" in err, err
        assert "vmloader snapshot shell" in err and "vmloader snapshot export" in err, err
        code, out, err = vmloader_as_user("snapshot", "diff", snapshot, "--json")
        assert code == 125 and json.loads(out)["error"] == "SnapshotError", (out, err)
        assert our_mounts() == []
    finally:
        if snapshot:
            vmloader_as_user("snapshot", "rm", snapshot, timeout=60)
        shutil.rmtree(work, ignore_errors=True)

"""Post-mortem: a kept job state boots again (unchanged), and exports to a standalone image."""
import json
import subprocess

import pytest

from .conftest import file_sha256

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]

POWEROFF = 'init=/bin/sh -- -c "mount -t proc proc /proc; cat /work/made.txt; echo o > /proc/sysrq-trigger; sleep 30"'


@pytest.fixture
def failed_job(vmloader):
    """A job that leaves a file, removes one, and fails: its state is kept."""
    run = vmloader("run", "--image", "debian-12", "--root", "--env", "STAGE=nightly", "--json", "--", "sh", "-c",
                   "echo built-by-job > /work/made.txt; rm /etc/issue.net; exit 7")
    result = run.json()
    assert result["exit_status"] == 7 and result["snapshot"], run.err
    return result["snapshot"]


def test_snapshot_exec_sees_the_jobs_state_and_leaves_the_snapshot_unchanged(vmloader, state_dir, failed_job):
    disk = state_dir / "snapshots" / failed_job / "disk.qcow2"
    before = file_sha256(disk)
    run = vmloader("snapshot", "exec", failed_job, "--", "sh", "-c",
                   "cat /work/made.txt; test -e /etc/issue.net || echo issue.net-gone; echo stage=$STAGE; "
                   "echo scratch > /work/made.txt; exit 3")
    assert run.returncode == 3, run.err
    assert run.out.split() == ["built-by-job", "issue.net-gone", "stage=nightly"]
    again = vmloader("snapshot", "exec", failed_job, "--", "cat", "/work/made.txt")
    assert again.out == "built-by-job\n"             # the first exec's write went to a throwaway overlay
    assert file_sha256(disk) == before


def test_snapshot_export_boots_on_its_own_with_plain_qemu(vmloader, state_dir, failed_job, tmp_path):
    exported = tmp_path / "standalone.qcow2"
    run = vmloader("snapshot", "export", failed_job, "-o", str(exported), "--json")
    assert run.returncode == 0, run.err
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(exported)],
                                     stdout=subprocess.PIPE, check=True).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    show = vmloader("snapshot", "show", failed_job, "--json").json()
    image = vmloader("images", "pull", show["image"], "--json").json()
    cmdline = "root=/dev/vda rw console=ttyS0 panic=1 " + POWEROFF
    boot = subprocess.run(["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot",
                           "-nodefaults", "-serial", "stdio", "-kernel", image["kernel"], "-initrd", image["initrd"],
                           "-append", cmdline, "-drive", f"file={exported},if=virtio,format=qcow2"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert b"built-by-job" in boot.stdout, boot.stdout[-3000:]


def test_snapshot_export_refuses_to_overwrite_and_names_unknown_ids(vmloader, failed_job, tmp_path):
    target = tmp_path / "exists.qcow2"
    target.write_text("mine")
    run = vmloader("snapshot", "export", failed_job, "-o", str(target))
    assert run.returncode == 125 and "exists" in run.err and target.read_text() == "mine"
    unknown = vmloader("snapshot", "exec", "no-such-id", "--", "true")
    assert unknown.returncode == 125 and "no snapshot with id 'no-such-id'" in unknown.err


def test_a_corrupted_snapshot_is_reported_and_nothing_is_deleted(vmloader, state_dir, failed_job):
    folder = state_dir / "snapshots" / failed_job
    with open(folder / "disk.qcow2", "r+b") as disk:
        disk.write(b"\0" * 512)                   # the qcow2 header is gone
    run = vmloader("snapshot", "exec", failed_job, "--", "true")
    assert run.returncode == 125, run.err
    assert failed_job in run.err and "qcow2" in run.err and "hint:" in run.err, run.err
    export = vmloader("snapshot", "export", failed_job, "-o", str(folder.parent / "out.qcow2"))
    assert export.returncode == 125 and "hint:" in export.err, export.err
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "console.log", "disk.qcow2", "metadata.json", "stderr.tail", "stdout.tail"]
    (folder / "metadata.json").write_text("{not json")
    shown = vmloader("snapshot", "show", failed_job)
    assert shown.returncode == 125 and "unreadable metadata" in shown.err
    assert (folder / "disk.qcow2").exists()


def test_export_without_room_leaves_no_partial_file_and_says_so(vmloader, state_dir, failed_job, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        before = file_sha256(state_dir / "snapshots" / failed_job / "disk.qcow2")
        run = vmloader("snapshot", "export", failed_job, "-o", str(small / "full.qcow2"))
        assert run.returncode == 125, run.err
        assert "is there room" in run.err and str(small) in run.err, run.err
        assert list(small.iterdir()) == []
        assert file_sha256(state_dir / "snapshots" / failed_job / "disk.qcow2") == before
    finally:
        subprocess.run(["umount", str(small)], check=True)

"""Stock images that reach the agent without cloud-init: through their qemu-guest-agent (on an XFS
root, and frozen with its memory at a timeout), with vmloader's agent baked in by the agent kit,
and the clear exit 125 of each that has no way in (none at all, qemu-ga with guest-exec blocked, no
python3). The images are variants of stockimage.BOOKWORM_BIOS (test_stock_images.py boots it with
cloud-init). Each boots once under TCG, checking several things.
"""
import filecmp
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import faulttable, stockimage
from .conftest import stock_disk

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]


def add_stock(vmloader, recipe: dict, name: str, cache: Path, tmp_path: Path) -> tuple:
    """`images add` of a copy of the built image: (env for later calls, the copy, the built image)."""
    source = stock_disk(recipe)
    disk = tmp_path / f"{name}.qcow2"
    shutil.copyfile(source, disk)
    env = {"VMLOADER_CACHE_DIR": str(cache), "VMLOADER_BOOT_TIMEOUT": "900"}
    added = vmloader("images", "add", name, "--disk", str(disk), "--json", env_extra=env)
    assert added.returncode == 0, added.err
    return env, disk, source


def boot_failure(vmloader, recipe: dict, name: str, cache: Path, tmp_path: Path, timeout: float = 900) -> tuple:
    """`run -- true` on a stock image with no way in for the agent: it fails 125 in its boot phase.
    (the error, the whole result, the image's copy, the built image)"""
    env, disk, source = add_stock(vmloader, recipe, name, cache, tmp_path)
    run = vmloader("run", "--image", name, "--snapshot", "never", "--json", "--", "true", env_extra=env,
                   timeout=timeout)
    result = run.json()
    assert run.returncode == 125, result
    assert result["error"]["phase"] == "boot", result["error"]
    return result["error"], result, disk, source


def nothing_left(fault: str, result: dict, disk: Path, source: Path) -> None:
    """No seed or overlay left of the failed job, the image unchanged; its row in the fault table."""
    job_dir = Path(result["job_dir"])
    assert not (job_dir / "cidata.img").exists() and not (job_dir / "overlay.qcow2").exists()
    assert filecmp.cmp(disk, source, shallow=False)
    faulttable.record(fault, result, "no VM, overlay or seed left; the base unchanged")


NONE_OF_THESE = "a stock image with neither qemu-guest-agent nor cloud-init (and no vmloader agent)"


def test_an_image_with_no_way_in_fails_125_soon_after_its_boot_finishes_naming_what_was_looked_for(
        vmloader, own_cache, tmp_path):
    error, result, disk, source = boot_failure(vmloader, stockimage.BOOKWORM_BIOS_BARE, "stock-bare", own_cache,
                                               tmp_path)
    # Soon after the boot finished, not at the end of the (900 s) boot timeout.
    assert "boot finished (its login prompt or multi-user.target" in error["message"]
    for looked_for in ("vmloader's agent", "org.qemu.guest_agent.0", "cloud-init"):
        assert looked_for in error["message"]
    assert "install qemu-guest-agent" in error["hint"] and "cloud-init" in error["hint"]
    nothing_left(NONE_OF_THESE, result, disk, source)


def test_an_image_with_the_agent_baked_in_by_the_agent_kit_is_reached_without_delivery(vmloader, own_cache,
                                                                                        tmp_path):
    """A site's image built with `images agent-kit` (install.sh run on its tree), neither qemu-ga nor
    cloud-init: the agent its unit starts answers (delivery builtin); the job user and /work made."""
    env, disk, source = add_stock(vmloader, stockimage.BOOKWORM_BIOS_BAKED, "stock-baked", own_cache, tmp_path)
    baked = vmloader("run", "--image", "stock-baked", "--snapshot", "never", "--json", "--", "sh", "-c",
                     "id -un; pwd; systemctl is-active vmloader-adopt.service; exit 5", env_extra=env, timeout=900)
    result = baked.json()
    assert baked.returncode == 5, result["error"]
    assert result["agent_delivery"] == "builtin"
    assert Path(result["stdout_path"]).read_text().split() == ["vmloader", "/work", "active"]
    assert filecmp.cmp(disk, source, shallow=False)


def test_an_xfs_stock_image_gets_the_agent_through_qemu_ga_and_a_timed_out_job_resumes_from_its_memory(
        vmloader, own_cache, booted, terminal, tmp_path):
    """An image with qemu-ga and no cloud-init gets the agent through qemu-ga, on an XFS root (delivery
    does not depend on the guest's filesystem), and runs the job as a user the image lacks, made at
    run time, with its stdin; `--timeout` freezes a stock image's VM with its memory (the delivered
    agent, the seed and qemu-ga channel, SeaBIOS) and `snapshot boot` resumes it with the agent it
    had; `snapshot exec` and `snapshot shell` attach to it; `snapshot diff` cannot read XFS and says
    so. One boot, one resume."""
    env, disk, source = add_stock(vmloader, stockimage.BOOKWORM_BIOS_XFS_QGA_ONLY, "stock-xfs", own_cache, tmp_path)
    started = time.monotonic()
    run = vmloader("run", "--image", "stock-xfs", "--snapshot", "always", "--timeout", "30",
                   "--env", "MARKER=frozen-on-xfs", "--json", "--", "sh", "-c",
                   "id -un; id -u; pwd; read line; echo $line; test -e /etc/cloud || echo no-cloud-init; "
                   "stat -f -c %T /; stat -c %a /usr/bin/sudo /var/tmp; ls /var/lib/ucf/cache; "
                   "echo started; exec sleep 100000", input=b"from-stdin\n", env_extra=env, timeout=1800)
    result = run.json()
    ran = time.monotonic() - started
    assert (result["exit_status"], result["outcome"]) == (124, "timeout"), result["error"]
    assert result["agent_delivery"] == "qemu-guest-agent"
    meta = json.loads((Path(result["job_dir"]) / "metadata.json").read_text())
    assert meta["agent_delivery"] == "qemu-guest-agent"
    name, uid, cwd, line, cloud, *rest = Path(result["stdout_path"]).read_text().split()
    # As the job user the image lacks: made at run time, clear of the image's own users.
    assert (name, cwd, line, cloud) == ("vmloader", "/work", "from-stdin", "no-cloud-init")
    assert int(uid) >= 60000
    # The root made from a prototype file: setuid and sticky bits, names mkfs.xfs -p cannot say.
    assert rest == ["xfs", "4755", "1777", ":etc:default:grub", ":etc:ssh:sshd_config", "started"]
    assert not (Path(result["job_dir"]) / "cidata.img").exists()     # the resume gets its own seed
    snap = result["snapshot"]
    assert vmloader("snapshot", "show", snap, "--json", env_extra=env).json()["memory"] is True

    diff = vmloader("snapshot", "diff", snap, env_extra=env)
    assert diff.returncode == 125, diff.err
    assert "holds an XFS file system" in diff.err and "ext2, ext3 and ext4" in diff.err

    resuming = time.monotonic()
    up = booted(snap, env=env)
    assert up["resumed_from_memory"] is True
    ps = vmloader("snapshot", "exec", snap, "--", "sh", "-c",
                  'pgrep -ax sleep; tr "\\0" "\\n" < /proc/$(pgrep -x sleep)/environ | grep MARKER; exit 3',
                  env_extra=env, timeout=900)
    assert ps.returncode == 3, ps.err
    assert "sleep 100000" in ps.out and "MARKER=frozen-on-xfs" in ps.out     # the very process, not a rerun
    # A shell on a real terminal, as the job's user, in the same running VM (no second boot).
    term = terminal("snapshot", "shell", snap, env=env)
    term.expect(b"$ ", timeout=600)
    term.send(b"echo shell-as-$(id -un)-on-$(stat -f -c %T /)-sees-$(pgrep -cx sleep)-sleep; exit 4\r")
    term.expect(b"shell-as-vmloader-on-xfs-sees-1-sleep", timeout=600)
    assert term.wait(timeout=300) == 4
    print(f"stock XFS image: run to timeout {ran:.0f} s (boot {result['timings'].get('boot')}), "
          f"resume to exec answered {time.monotonic() - resuming:.0f} s", file=sys.stderr)
    assert filecmp.cmp(disk, source, shallow=False)


GUEST_EXEC_BLOCKED = "a stock image whose qemu-ga has guest-exec blocked by its config (and no cloud-init)"


def test_a_qemu_ga_with_guest_exec_blocked_and_no_cloud_init_fails_125_naming_it(vmloader, own_cache, tmp_path):
    error, result, disk, source = boot_failure(vmloader, stockimage.BOOKWORM_BIOS_QGA_NO_EXEC, "stock-no-exec",
                                               own_cache, tmp_path, timeout=1800)
    # qemu-ga answered, so it is named with what stopped the delivery, and nothing else got in.
    assert "the QEMU guest agent answered but delivery failed: guest-exec is disabled in the guest's qemu-ga " \
           "by its configuration (block-rpcs" in error["message"]
    assert "cloud-init" in error["message"] and "guest-exec and guest-file-* allowed" in error["hint"]
    nothing_left(GUEST_EXEC_BLOCKED, result, disk, source)


NO_PYTHON = "a stock image with qemu-guest-agent and no python3"


def no_python_recipe() -> dict:
    """The qemu-ga-only image with every python package of its tree purged too, as a minimal image
    without python would be. (Here rather than in stockimage.RECIPES: its purge list is read from
    the tree; the image is cached under its own name beside the others.)"""
    stock_disk(stockimage.BOOKWORM_BIOS_QGA_ONLY)         # the tree exists from here on
    tree = stockimage.CACHE / f"tree-{stockimage.tree_hash(stockimage.BOOKWORM_BIOS)}"
    names = subprocess.run(["chroot", str(tree), "dpkg-query", "-W", "-f", "${Package}\n"], capture_output=True,
                           text=True, check=True).stdout.split()
    return dict(stockimage.BOOKWORM_BIOS, name="bookworm-bios-qga-nopython",
                purge=["cloud-init"] + [name for name in names if "python" in name])


def test_an_image_without_python3_fails_125_after_its_boot_naming_python3(vmloader, own_cache, tmp_path):
    error, result, disk, source = boot_failure(vmloader, no_python_recipe(), "stock-nopython", own_cache, tmp_path)
    # qemu-ga answered and ran adopt.sh, which said what is missing: no way in can do better, so
    # the job ends there (not after the boot's grace, nor at the boot timeout).
    assert "the guest cannot run vmloader's agent" in error["message"], error
    assert "the guest has no python3 (the agent needs python3 >= 3.6)" in error["message"], error
    assert "install python3 (>= 3.6)" in error["hint"]
    nothing_left(NO_PYTHON, result, disk, source)

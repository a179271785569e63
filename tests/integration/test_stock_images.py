"""A distribution-style cloud image (grub in the MBR, systemd, cloud-init, qemu-guest-agent, no vmloader
file inside) registered with `images add` and run unmodified: firmware boot, the agent delivered at boot.
A trixie image booting with UEFI (GPT, EFI system partition, OVMF), its variable store kept with its
snapshots, and the clear error on a worker without OVMF. What `images inspect` reads in them offline.
The other ways in (qemu-ga, an agent baked in, none) are in test_stock_delivery.py.

Stock images boot slowly under TCG (their own boot loader, systemd, cloud-init): few boots, each
checking several things.
"""
import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from . import faulttable, stockimage
from .conftest import next_line, stock_disk

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]


@pytest.fixture(scope="module")
def stock_bios_disk():
    return stock_disk(stockimage.BOOKWORM_BIOS)


def test_a_stock_bios_image_runs_jobs_with_the_agent_delivered_at_boot_and_stays_byte_identical(
        vmloader, vm_env, state_dir, stock_bios_disk, own_cache, tmp_path):
    disk = tmp_path / "stock.qcow2"
    shutil.copyfile(stock_bios_disk, disk)
    # A stock image boots its own firmware, grub, systemd and cloud-init: under TCG on a busy
    # host that takes minutes (about 40 s alone), so the boot deadline is generous.
    env = {"VMLOADER_CACHE_DIR": str(own_cache), "VMLOADER_BOOT_TIMEOUT": "900"}
    added = vmloader("images", "add", "stock-bookworm", "--disk", str(disk), "--json", env_extra=env)
    assert added.returncode == 0, added.err
    entry = added.json()
    assert entry["boot"] == "bios"                       # read from the disk: grub's code in the MBR
    base = own_cache / "artifacts" / entry["artifacts"]["disk"]["sha256"]
    before = entry["artifacts"]["disk"]["sha256"]

    # As root, with no network: the NIC reaches nothing, yet the boot does not wait for it.
    out = tmp_path / "out"
    root = vmloader("run", "--image", "stock-bookworm", "--network", "none", "--root", "--snapshot", "always",
                    "--output", "deep/file", "--output-new", "--output-dir", str(out), "--json", "--", "sh", "-c",
                    "id -u; echo to-stderr >&2; echo kept > /root/mark && cat /root/mark; "
                    "mkdir deep && echo deep > deep/file; echo made > made.txt; "
                    "test -e /usr/lib/vmloader && echo baked-in; exit 7", env_extra=env, timeout=900)
    result = root.json()
    assert root.returncode == 7, result["error"]
    # Files back as from our own image: one named, the new top-level ones found by listing.
    assert (out / "deep" / "file").read_text() == "deep\n" and (out / "made.txt").read_text() == "made\n"
    # Both are in the image and both are tried, but cloud-init always comes first: its units are
    # ordered before sysinit.target and run the seed's bootcmd there, while qemu-ga's unit (default
    # dependencies) starts only after basic.target, so after cloud-init's first stages have ended.
    assert result["agent_delivery"] == "cloud-init"
    # Warm start (the default) covers SeaBIOS stock images: this first job booted the image once,
    # delivered the agent, saved that VM with its memory and restored it for the command.
    assert result["start"] == "warm" and "warm build" in result["timings"], result["timings"]
    assert Path(result["stdout_path"]).read_text().split() == ["0", "kept"]
    assert Path(result["stderr_path"]).read_text() == "to-stderr\n"
    meta = json.loads((Path(result["job_dir"]) / "metadata.json").read_text())
    assert meta["agent_delivery"] == result["agent_delivery"]

    # The kept disk read offline: its ext4 root inside the MBR partition table.
    diff = vmloader("snapshot", "diff", result["snapshot"], "--json", env_extra=env)
    assert diff.returncode == 0, diff.err
    assert "/root/mark" in {change["path"] for change in diff.json()["added"]}
    # ... and exported as a standalone disk that is still the stock image (its boot code, partitions).
    exported = tmp_path / "exported.qcow2"
    export = vmloader("snapshot", "export", result["snapshot"], "-o", str(exported), "--json", env_extra=env)
    assert export.returncode == 0, export.err
    assert "backing-filename" not in json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(exported)], capture_output=True, check=True).stdout)
    shown = vmloader("images", "inspect", str(exported), "--json", env_extra=env, timeout=600)
    assert shown.returncode == 0, shown.err
    info = shown.json()
    assert (info["table"], info["boot"], info["filesystem"], info["cloud_init"]) == ("mbr", "bios", "ext4", True)

    # Reopened: the kept disk boots again, its own firmware and boot (no warm state for a kept disk),
    # and goes straight to the way the first job's boot found (remembered for the image, per user).
    reopen = vmloader("snapshot", "exec", "--root", result["snapshot"], "--", "sh", "-c",
                      "cat /root/mark; test -e /usr/lib/vmloader && echo baked-in; exit 4",
                      env_extra=env, timeout=900)
    assert reopen.returncode == 4, reopen.err
    assert reopen.out.splitlines() == ["kept"]
    [reopened] = [path for path in (state_dir / "jobs").iterdir() if path.name != Path(result["job_dir"]).name]
    meta = json.loads((reopened / "metadata.json").read_text())
    assert (meta["agent_delivery"], meta["agent_delivery_remembered"]) == ("cloud-init", True), meta

    # The next job of the image restores that state: no boot, no delivery, its own identity.
    again = vmloader("run", "--image", "stock-bookworm", "--network", "none", "--snapshot", "never", "--json",
                     "--", "sh", "-c", "hostname; id -un; cat /root/mark 2>/dev/null || echo clean",
                     env_extra=env, timeout=900)
    warm = again.json()
    assert again.returncode == 0, warm["error"]
    assert warm["start"] == "warm" and "warm build" not in warm["timings"], warm["timings"]
    assert warm["agent_delivery"] == "cloud-init"
    assert Path(warm["stdout_path"]).read_text().split() == [f"vm-{warm['job_id'][-6:]}", "vmloader", "clean"]
    print(f"stock BIOS image: first job {result['timings']}, warm job {warm['timings']}", file=sys.stderr)

    # Output streams live, stdin reaches the command: the first lines arrive while the command
    # still waits for its stdin (it cannot have ended), stderr stays apart.
    live = subprocess.Popen([sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "stock-bookworm",
                             "--network", "none", "--snapshot", "never", "--", "sh", "-c",
                             "echo first-line; read given; echo got-$given; echo err-$given >&2; exit 5"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(vm_env, **env), cwd=tmp_path)
    try:
        assert next_line(live) == b"first-line\n"
        rest, err = live.communicate(b"fed\n", timeout=900)     # (then stdin closes: EOF)
    finally:
        if live.poll() is None:
            live.terminate()
            live.wait(timeout=300)
    assert (live.returncode, rest) == (5, b"got-fed\n"), err
    assert b"err-fed\n" in err and b"got-fed" not in err

    assert filecmp.cmp(disk, stock_bios_disk, shallow=False)
    assert not base.exists() or filecmp.cmp(base, stock_bios_disk, shallow=False)


NO_OVMF = "a UEFI image on a worker without OVMF"
PROBE_CONTROL = """\
Package: uefi-probe
Version: 1.0
Architecture: all
Maintainer: vmloader tests <tests@vmloader.invalid>
Description: a package a root job installs in a stock image
"""


def tiny_deb(where: Path) -> Path:
    """A .deb built here (nothing is downloaded): one file, /usr/share/uefi-probe/hello."""
    tree = where / "uefi-probe"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(PROBE_CONTROL)
    (tree / "usr/share/uefi-probe").mkdir(parents=True)
    (tree / "usr/share/uefi-probe/hello").write_text("installed by a job\n")
    deb = where / "uefi-probe_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)], check=True,
                   stdout=subprocess.DEVNULL)
    return deb


def test_a_stock_uefi_image_boots_with_ovmf_runs_a_root_job_installing_a_package_kept_with_its_variable_store(
        vmloader, own_cache, state_dir, tmp_path):
    source = stock_disk(stockimage.TRIXIE_UEFI)
    disk = tmp_path / "trixie.qcow2"
    shutil.copyfile(source, disk)
    # OVMF, grub, systemd and cloud-init under TCG: 849 s to the agent once on a host loaded 12-14.
    env = {"VMLOADER_CACHE_DIR": str(own_cache), "VMLOADER_BOOT_TIMEOUT": "1800"}
    added = vmloader("images", "add", "stock-trixie", "--disk", str(disk), "--json", env_extra=env)
    assert added.returncode == 0, added.err
    assert added.json()["boot"] == "uefi"                  # read from the disk: GPT with an EFI system partition
    before = added.json()["artifacts"]["disk"]["sha256"]
    deb = tiny_deb(tmp_path)

    # As root: installs the package it was given, keeps a mark, output apart, its own exit code.
    root = vmloader("run", "--image", "stock-trixie", "--root", "--snapshot", "always", "--input", str(deb),
                    "--json", "--", "sh", "-c",
                    "dpkg -i uefi-probe_1.0_all.deb >/dev/null && dpkg -s uefi-probe | grep '^Status:'; "
                    "test -d /sys/firmware/efi && echo efi; id -u; echo to-stderr >&2; "
                    "echo kept > /root/mark; exit 3", env_extra=env, timeout=2400)
    result = root.json()
    assert root.returncode == 3, result["error"]
    assert result["agent_delivery"] == "cloud-init"        # no qemu-guest-agent in this image
    assert Path(result["stdout_path"]).read_text().splitlines() == [
        "Status: install ok installed", "efi", "0"]
    assert Path(result["stderr_path"]).read_text() == "to-stderr\n"
    print(f"UEFI stock image: timings {result['timings']}")
    kept_vars = state_dir / "snapshots" / result["snapshot"] / "uefi-vars.fd"
    assert kept_vars.stat().st_size > 0                    # OVMF's variable store, kept with the disk
    job_dir = Path(result["job_dir"])
    assert not (job_dir / "uefi-vars.fd").exists() and not (job_dir / "overlay.qcow2").exists()
    # The kept disk read offline: the package's file and the mark in the ext4 root inside the GPT.
    # (A kept stock disk booting again is test_a_stock_bios_image_...'s reopen.)
    diff = vmloader("snapshot", "diff", result["snapshot"], "--json", env_extra=env)
    assert diff.returncode == 0, diff.err
    assert {"/root/mark", "/usr/share/uefi-probe/hello"} <= {change["path"] for change in diff.json()["added"]}

    # A worker without OVMF: a clear error before any VM or file is made, the base untouched.
    missing = vmloader("run", "--image", "stock-trixie", "--snapshot", "always", "--json", "--", "true",
                       env_extra=dict(env, VMLOADER_OVMF_DIR=str(tmp_path / "no-ovmf-here")), timeout=600)
    failed = missing.json()
    assert missing.returncode == 125, failed
    assert failed["error"]["phase"] == "define" and failed["snapshot"] is None
    assert "OVMF" in failed["error"]["message"] and "apt-get install ovmf" in failed["error"]["hint"]
    left = {path.name for path in Path(failed["job_dir"]).iterdir()}
    assert not left & {"overlay.qcow2", "cidata.img", "uefi-vars.fd", "domain.xml"}
    assert filecmp.cmp(disk, source, shallow=False)
    base = own_cache / "artifacts" / before
    assert not base.exists() or filecmp.cmp(base, source, shallow=False)
    faulttable.record(NO_OVMF, failed, "no VM, overlay, seed or variable store left; the base unchanged")


# What `images inspect` must read in each stock image, offline: (table, boot, root fs, os-release ID and
# VERSION_ID, python3, cloud-init, qemu-guest-agent). The XFS root's contents are not readable offline.
INSPECTED = [(stockimage.BOOKWORM_BIOS, ("mbr", "bios", "ext4", "12", "3.11", True, True)),
             (stockimage.BOOKWORM_BIOS_BARE, ("mbr", "bios", "ext4", "12", "3.11", False, False)),
             (stockimage.BOOKWORM_BIOS_XFS_QGA_ONLY, ("mbr", "bios", "xfs", None, None, False, False)),
             (stockimage.TRIXIE_UEFI, ("gpt", "uefi", "ext4", "13", "3.13", True, False))]


@pytest.mark.parametrize("recipe, expected", INSPECTED, ids=[recipe["name"] for recipe, _ in INSPECTED])
def test_images_inspect_reads_a_stock_image_offline_without_booting_it(vmloader, recipe, expected, tmp_path):
    disk = stock_disk(recipe)
    before = disk.stat().st_mtime_ns
    shown = vmloader("images", "inspect", str(disk), "--json", timeout=600)
    assert shown.returncode == 0, shown.err
    info = shown.json()
    python = info["python3"]["version"] if info["python3"] else None
    assert (info["table"], info["boot"], info["filesystem"], info["os_release"].get("VERSION_ID"), python,
            info["cloud_init"], info["qemu_guest_agent"]) == expected
    assert info["contents_read"] == (expected[2] != "xfs") and not info["vmloader_agent"]
    assert bool(info["kernels"]) == info["contents_read"]
    assert disk.stat().st_mtime_ns == before

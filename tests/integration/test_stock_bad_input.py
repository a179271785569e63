"""Bad input for images with their own boot loader (issue 12): each a clear error (exit 125 at run
time), nothing left behind (VM, overlay, seed, NVRAM), the base untouched, and a row in the fault table.

All but one fail in the firmware or before the VM starts; the image whose cloud-init ignores the seed
boots to its login prompt (a stock test image, stockimage.py).
"""
import filecmp
import shutil
import subprocess
from pathlib import Path

import pytest

from vmloader.bootstrapper.cache import ImageCache
from vmloader.bootstrapper.catalog import ImageEntry

from . import faulttable, stockimage
from .conftest import file_sha256, stock_disk

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]

NOT_QCOW2_NOR_RAW = "a disk that is neither qcow2 nor raw (vmdk), at `images add`"
NO_BOOT_CODE = "a disk with an MBR partition table and no boot code (`images add --boot bios`)"
NO_BOOTABLE_DEVICE = "a disk SeaBIOS finds nothing to boot on (boot code, no boot signature): \"No bootable device\""
NO_MTOOLS = "a worker without mtools: the cloud-init seed cannot be made"
SEED_IGNORED = ("a stock image whose cloud-init never reads the seed (`datasource_list: [ None ]`), "
                "and no qemu-guest-agent")


def raw_disk(tmp_path: Path, name: str, first_bytes: bytes = b"", mbr_table: bool = False) -> Path:
    raw = tmp_path / f"{name}.raw"
    subprocess.run(["truncate", "-s", "64M", str(raw)], check=True)
    if mbr_table:
        subprocess.run(["sfdisk", "-q", str(raw)], input="label: dos\nstart=2048, type=83\n", text=True, check=True)
    with open(raw, "r+b") as disk:
        disk.write(first_bytes)
    return raw


def add_unbootable_bios_image(vmloader, own_cache: Path, tmp_path: Path) -> tuple:
    """A disk whose first sector has code (`jmp $`) but no boot signature: SeaBIOS says there is
    nothing to boot. Not recognised by `images add` (no signature), taken with --boot bios."""
    env = {"VMLOADER_CACHE_DIR": str(own_cache), "VMLOADER_BOOT_TIMEOUT": "900"}
    added = vmloader("images", "add", "unbootable", "--disk", str(raw_disk(tmp_path, "nosig", b"\xeb\xfe")),
                     "--boot", "bios", "--json", env_extra=env)
    assert added.returncode == 0, added.err
    entry = added.json()
    assert entry["boot"] == "bios"
    base = own_cache / "artifacts" / entry["artifacts"]["disk"]["sha256"]
    return env, base, file_sha256(base)


def nothing_left(job_dir: Path) -> list:
    return [name for name in ("overlay.qcow2", "cidata.img", "nvram.fd", "OVMF_VARS.fd") if (job_dir / name).exists()]


def test_a_disk_neither_qcow2_nor_raw_is_refused_at_images_add_naming_its_format(vmloader, own_cache, tmp_path):
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "16M"], check=True)
    before = file_sha256(vmdk)
    added = vmloader("images", "add", "mine", "--disk", str(vmdk), env_extra={"VMLOADER_CACHE_DIR": str(own_cache)})
    assert added.returncode == 125, added.err
    assert "is a vmdk disk image: images add takes qcow2 or raw" in added.err
    assert "qemu-img convert -O qcow2" in added.err
    assert not list((own_cache / "artifacts").glob("*")) if (own_cache / "artifacts").exists() else True
    assert file_sha256(vmdk) == before
    said = added.err.strip().splitlines()[0].replace(str(vmdk), vmdk.name)
    faulttable.record_row(NOT_QCOW2_NOR_RAW, 125, "refused", "", said,
                          "nothing cached; the file unchanged")


def test_a_disk_with_a_partition_table_and_no_boot_code_is_refused_even_with_boot_bios(vmloader, own_cache,
                                                                                       tmp_path):
    # SeaBIOS would see the MBR's signature, run the zeros and hang silently until the boot timeout.
    disk = raw_disk(tmp_path, "nocode", mbr_table=True)
    env = {"VMLOADER_CACHE_DIR": str(own_cache)}
    plain = vmloader("images", "add", "nocode", "--disk", str(disk), env_extra=env)
    assert plain.returncode == 125 and "no boot loader found" in plain.err, plain.err
    forced = vmloader("images", "add", "nocode", "--disk", str(disk), "--boot", "bios", env_extra=env)
    assert forced.returncode == 125, forced.err
    assert "--boot bios: its first sector holds no boot code" in forced.err and "--boot uefi" in forced.err
    assert not [p for p in (own_cache / "artifacts").glob("*")] if (own_cache / "artifacts").exists() else True
    faulttable.record_row(NO_BOOT_CODE, 125, "refused", "", forced.err.strip().splitlines()[0].replace(
        str(disk), disk.name), "nothing cached; the file unchanged")
    # A catalogue that says bios anyway (a repository's manifest, an older vmloader's `images add`):
    # the job fails before its VM is made, not at the boot timeout.
    converted = tmp_path / "nocode.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(converted)], check=True)
    ImageCache(own_cache).add_custom(ImageEntry(name="nocode", version="custom", boot="bios", cmdline=""),
                                     {"disk": converted})
    run = vmloader("run", "--image", "nocode", "--snapshot", "never", "--json", "--", "true",
                   env_extra=dict(env, VMLOADER_BOOT_TIMEOUT="900"), timeout=900)
    result = run.json()
    assert run.returncode == 125, result
    assert result["error"]["phase"] == "boot", result["error"]
    assert "cannot boot with SeaBIOS: its first sector holds no boot code" in result["error"]["message"]
    assert nothing_left(Path(result["job_dir"])) == []


def test_a_disk_seabios_finds_nothing_to_boot_on_fails_125_at_once_naming_it(vmloader, own_cache, tmp_path):
    env, base, before = add_unbootable_bios_image(vmloader, own_cache, tmp_path)
    run = vmloader("run", "--image", "unbootable", "--snapshot", "never", "--json", "--", "true", env_extra=env,
                   timeout=900)
    result = run.json()
    assert run.returncode == 125, result
    error = result["error"]
    # SeaBIOS's "No bootable device" on the console: the job ends there, not at the 900 s boot timeout.
    assert error["phase"] == "boot" and "the firmware found nothing to boot on the disk" in error["message"], error
    assert "--boot" in error["hint"]
    assert "No bootable device" in Path(result["console_log"]).read_text(errors="replace")
    assert nothing_left(Path(result["job_dir"])) == []
    assert file_sha256(base) == before
    faulttable.record(NO_BOOTABLE_DEVICE, result, "no VM, overlay or seed left; the base unchanged")


def test_a_worker_without_mtools_fails_125_before_the_vm_naming_mtools(vmloader, own_cache, tmp_path):
    env, base, before = add_unbootable_bios_image(vmloader, own_cache, tmp_path)
    mtools = {Path(p).name for p in subprocess.run(["dpkg", "-L", "mtools"], capture_output=True, text=True,
                                                    check=True).stdout.split() if p.startswith("/usr/bin/")}
    assert {"mcopy", "mformat"} <= mtools
    bin_dir = tmp_path / "bin"                 # this host's /usr/bin without mtools' commands
    bin_dir.mkdir()
    for tool in Path("/usr/bin").iterdir():
        if tool.name not in mtools:
            (bin_dir / tool.name).symlink_to(tool)
    path = ":".join([str(bin_dir), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    run = vmloader("run", "--image", "unbootable", "--snapshot", "never", "--json", "--", "true",
                   env_extra=dict(env, PATH=path), timeout=600)
    result = run.json()
    assert run.returncode == 125, result
    error = result["error"]
    assert error["phase"] == "setup" and "mformat is missing on this worker" in error["message"], error
    assert "mtools" in error["hint"]
    assert nothing_left(Path(result["job_dir"])) == []
    assert file_sha256(base) == before
    faulttable.record(NO_MTOOLS, result, "no VM, overlay or seed left; the base unchanged")


def test_an_image_whose_cloud_init_never_reads_the_seed_fails_125_soon_after_its_boot_naming_that(
        vmloader, own_cache, tmp_path):
    # A site's golden image: cloud-init configured to read no datasource vmloader can seed, no qemu-ga.
    source = stock_disk(stockimage.BOOKWORM_BIOS_CLOUD_INIT_NO_SEED)
    disk = tmp_path / "noseed.qcow2"
    shutil.copyfile(source, disk)
    # The grace after its login prompt shortened (the worker setting stock_boot_grace): its cloud-init's
    # early stages, which would have read the seed, are over by then; its later ones need not be waited.
    env = {"VMLOADER_CACHE_DIR": str(own_cache), "VMLOADER_BOOT_TIMEOUT": "900", "VMLOADER_STOCK_BOOT_GRACE": "8"}
    added = vmloader("images", "add", "stock-noseed", "--disk", str(disk), "--json", env_extra=env)
    assert added.returncode == 0, added.err
    run = vmloader("run", "--image", "stock-noseed", "--snapshot", "never", "--json", "--", "true", env_extra=env,
                   timeout=1200)
    result = run.json()
    assert run.returncode == 125, result
    error = result["error"]
    assert error["phase"] == "boot", error
    # Soon after the boot finished (the grace after its login prompt), not at the 900 s boot timeout.
    assert "the guest's boot finished (its login prompt" in error["message"], error
    assert "nothing answered within 8 s" in error["message"], error
    assert "cloud-init ran in the guest but never read vmloader's seed (the `cidata` disk, NoCloud)" \
        in error["message"], error
    assert "datasource_list" in error["hint"] and "NoCloud" in error["hint"] and "qemu-guest-agent" in error["hint"]
    console = Path(result["console_log"]).read_text(errors="replace")
    assert "Cloud-init v. " in console and "cloud-init[" in console      # it did run, and said so
    assert nothing_left(Path(result["job_dir"])) == []
    assert filecmp.cmp(disk, source, shallow=False)
    faulttable.record(SEED_IGNORED, result, "no VM, overlay or seed left; the base unchanged")

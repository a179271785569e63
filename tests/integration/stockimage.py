"""A stand-in for a distribution's published cloud image, built here from Debian packages.

Nothing can be downloaded from outside, so the tests build what Debian's
genericcloud image is: a partitioned (MBR) disk whose first sector holds grub's
boot code, an ext4 root with systemd, linux-image-cloud-amd64, cloud-init,
qemu-guest-agent, python3 and openssh-server, and no vmloader file inside.
And its trixie UEFI counterpart (TRIXIE_UEFI): a GPT disk with an EFI system
partition holding grub at the removable path \\EFI\\BOOT\\BOOTX64.EFI, cloud-init
and no qemu-guest-agent.

Built once (several minutes) into the test cache under a hash of the recipe
below and reused until the recipe changes. Needs root (debootstrap, chroot); no
loop devices (losetup -P makes no partitions on some hosts), and no mount outside a build's own
mount namespace (its root: an overlay over the tree).

    sudo python3 -m tests.integration.stockimage [NAME]   # build (or find) it, print its path
    sudo python3 -m tests.integration.stockimage --prepare  # every image, in the tests' order (make test)
"""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

from . import xfsproto

CACHE = Path(os.environ.get("VMLOADER_TEST_CACHE", "/var/cache/vmloader-test")) / "stock-images"
REPO_ROOT = Path(__file__).resolve().parents[2]

BOOKWORM_BIOS = {
    "name": "bookworm-bios",
    "suite": "bookworm",
    "packages": ["systemd", "systemd-sysv", "udev", "dbus", "linux-image-cloud-amd64", "initramfs-tools",
                 "grub-pc", "cloud-init", "qemu-guest-agent",
                 "python3-cffi-backend",     # provides a virtual package debootstrap cannot resolve
 "python3", "openssh-server", "sudo",
                 "ifupdown", "isc-dhcp-client", "netbase", "e2fsprogs"],
    "disk_gib": 3,
    "layout": "mbr",
    "version": "3",
}
# Cheap variants of the same tree (no second debootstrap): the packages named in "purge" are
# removed with dpkg in the image's copy of the tree.
BOOKWORM_BIOS_QGA_ONLY = dict(BOOKWORM_BIOS, name="bookworm-bios-qga-only", purge=["cloud-init"])
BOOKWORM_BIOS_BARE = dict(BOOKWORM_BIOS, name="bookworm-bios-bare", purge=["cloud-init", "qemu-guest-agent"])
# The same qemu-ga-only tree on an XFS root (made with mkfs.xfs -p from a prototype file, no mount):
# delivery must not depend on the guest's filesystem, and `snapshot diff` cannot read it.
BOOKWORM_BIOS_XFS_QGA_ONLY = dict(BOOKWORM_BIOS_QGA_ONLY, name="bookworm-bios-xfs-qga-only", rootfs="xfs")
# A site's golden image with vmloader's agent baked in (`images agent-kit` + its install.sh run on the
# tree) and neither qemu-ga nor cloud-init: the host finds the agent it starts (delivery "builtin").
BOOKWORM_BIOS_BAKED = dict(BOOKWORM_BIOS_BARE, name="bookworm-bios-baked", bake_agent=True)
# qemu-ga only, with guest-exec blocked by qemu-ga's own configuration (and no cloud-init to fall through to).
QGA_EXEC_BLOCKED_CONF = "[general]\nblock-rpcs=guest-exec\n"
BOOKWORM_BIOS_QGA_NO_EXEC = dict(BOOKWORM_BIOS_QGA_ONLY, name="bookworm-bios-qga-no-exec",
                                 files={"etc/qemu/qemu-ga.conf": QGA_EXEC_BLOCKED_CONF})
# A site's golden image whose cloud-init reads no datasource vmloader can seed (its cloud.cfg.d says
# `datasource_list: [ None ]`), and no qemu-guest-agent: cloud-init runs at boot but never reads the
# job's cidata seed.
SITE_DATASOURCE_CFG = "datasource_list: [ None ]\n"
BOOKWORM_BIOS_CLOUD_INIT_NO_SEED = dict(BOOKWORM_BIOS, name="bookworm-bios-cloud-init-no-seed",
                                        purge=["qemu-guest-agent"],
                                        files={"etc/cloud/cloud.cfg.d/99-site-datasource.cfg": SITE_DATASOURCE_CFG})
# Debian 13 the way its genericcloud image boots on UEFI: GPT, an EFI system partition holding grub
# at the removable path \EFI\BOOT\BOOTX64.EFI, cloud-init and no qemu-guest-agent.
TRIXIE_UEFI = {
    "name": "trixie-uefi",
    "suite": "trixie",
    "packages": ["systemd", "systemd-sysv", "udev", "dbus", "linux-image-cloud-amd64", "initramfs-tools",
                 "grub-efi-amd64-bin", "cloud-init",
                 "python3-cffi-backend",     # provides a virtual package debootstrap cannot resolve
                 "python3", "openssh-server", "sudo",
                 "ifupdown", "isc-dhcp-client", "netbase", "e2fsprogs"],
    "disk_gib": 3,
    "layout": "gpt-esp",
    "version": "1",
}

# What a distribution configures on top of the packages (Debian's cloud image does the same things).
GRUB_DEFAULTS = """\
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB_DISABLE_OS_PROBER=true
"""
NETWORK_INTERFACES = """\
auto lo
iface lo inet loopback
source /etc/network/interfaces.d/*
"""


def _say(message: str) -> None:
    print(f"stockimage: {message}", file=sys.stderr, flush=True)


def tree_hash(recipe: dict) -> str:
    """The debootstrap tree: changes only with the suite and packages."""
    text = json.dumps({"suite": recipe["suite"], "packages": recipe["packages"]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recipe_hash(recipe: dict) -> str:
    """The finished image: the tree plus everything this module configures and how it lays out the disk."""
    code = Path(__file__).read_bytes() + (Path(__file__).parent / "xfsproto.py").read_bytes()
    if recipe.get("bake_agent"):                  # the agent inside: a new agent, a new image
        from vmloader.bootstrapper import agentkit
        code += b"".join(agentkit.kit_contents().values())
    return hashlib.sha256(code + tree_hash(recipe).encode()).hexdigest()[:16]


def _run(args: list, **kwargs) -> str:
    result = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def _debootstrap(recipe: dict, tree: Path) -> None:
    marker = tree / ".stock-complete"
    if marker.exists():
        _say(f"reusing debootstrap tree {tree}")
        return
    shutil.rmtree(tree, ignore_errors=True)
    tree.parent.mkdir(parents=True, exist_ok=True)
    _say(f"debootstrap {recipe['suite']} with {len(recipe['packages'])} packages (several minutes)")
    started = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    debs = CACHE / "debs"            # downloaded packages, kept for the next recipe
    debs.mkdir(parents=True, exist_ok=True)
    _run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}", "--include=" + ",".join(recipe["packages"]),
          recipe["suite"], str(tree)], env=env)
    marker.write_text("ok\n")
    _say(f"debootstrap done in {time.monotonic() - started:.0f} s")


FSTAB = {"ext4": "UUID={uuid} / ext4 errors=remount-ro 0 1\n",
         "xfs": "UUID={uuid} / xfs defaults 0 0\n"}       # XFS is never fsck'd at boot (fsck.xfs does nothing)
GRUB_FS_MODULE = {"ext4": "ext2", "xfs": "xfs"}


def _configure(root: Path, uuid: str, rootfs: str = "ext4", layout: str = "mbr") -> None:
    (root / ".stock-complete").unlink(missing_ok=True)
    (root / "etc/fstab").write_text(FSTAB[rootfs].format(uuid=uuid))
    (root / "etc/hostname").write_text("localhost\n")
    (root / "etc/default/grub").write_text(GRUB_DEFAULTS)
    (root / "etc/network/interfaces").write_text(NETWORK_INTERFACES)
    (root / "etc/machine-id").write_text("")            # first boot makes one, as in a published image
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (root / junk).glob("*"):
            if path.is_file():
                path.unlink()
    kernel = sorted((root / "boot").glob("vmlinuz-*"))[-1].name
    initrd = sorted((root / "boot").glob("initrd.img-*"))[-1].name
    (root / "boot/grub").mkdir(parents=True, exist_ok=True)
    table = "part_gpt" if layout == "gpt-esp" else "part_msdos"
    (root / "boot/grub/grub.cfg").write_text(GRUB_CFG.format(uuid=uuid, kernel=kernel, initrd=initrd, table=table,
                                                             fsmodule=GRUB_FS_MODULE[rootfs]))


# What update-grub writes for one kernel, reduced: serial console, no menu.
GRUB_CFG = """\
serial --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
insmod {table}
insmod {fsmodule}
search --no-floppy --fs-uuid --set=root {uuid}
linux /boot/{kernel} root=UUID={uuid} ro console=tty0 console=ttyS0,115200
initrd /boot/{initrd}
boot
"""
BOOT_DRIVE_CHECK = 0x66      # grub-setup replaces this jump with two NOPs for hard disks


def _grub_mbr(root: Path, rootfs: str = "ext4") -> tuple:
    """grub's boot.img (first 440 bytes) and a core.img for sector 1 onwards, as grub-install makes them,
    core.img with the module that reads the root filesystem (where /boot/grub is)."""
    lib = root / "usr/lib/grub/i386-pc"
    _run(["chroot", str(root), "grub-mkimage", "-O", "i386-pc", "-o", "/core.img",
          "-p", "(hd0,msdos1)/boot/grub", "biosdisk", "part_msdos", GRUB_FS_MODULE[rootfs], "search_fs_uuid"])
    modules = root / "boot/grub/i386-pc"            # what grub-install copies beside grub.cfg
    modules.mkdir(parents=True, exist_ok=True)
    for path in lib.iterdir():
        if path.suffix in (".mod", ".lst", ".img"):
            shutil.copyfile(path, modules / path.name)
    core = (root / "core.img").read_bytes()
    (root / "core.img").unlink()
    boot = bytearray((lib / "boot.img").read_bytes()[:440])
    boot[BOOT_DRIVE_CHECK:BOOT_DRIVE_CHECK + 2] = b"\x90\x90"
    if len(core) > (2048 - 1) * 512:
        raise RuntimeError("grub's core.img does not fit before the first partition")
    return bytes(boot), core


def _root_filesystem(rootfs: str, root: Path, disk: Path, offset: int, size: int, uuid: str, work: Path) -> None:
    """The root filesystem of `size` bytes made from `root`, `offset` bytes into the partitioned `disk`.
    ext4 is written there by mke2fs itself (`-E offset`: no separate partition file to copy in,
    which cost more CPU than making the filesystem); XFS is made in a file of its own and copied in."""
    if rootfs == "xfs":
        part = work / "part.raw"
        made = xfsproto.make(root, part, size, uuid, "rootfs")
        for names in made.hardlinks.values():
            _say(f"hard links written as copies (a prototype file cannot link): {', '.join(names)}")
        if made.acls_left_out:
            _say(f"POSIX ACLs left out (systemd-tmpfiles sets them at boot): {', '.join(made.acls_left_out)}")
        _run(["dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={offset // 2 ** 20}", "conv=notrunc,sparse",
              "status=none"])
        part.unlink()
        return
    _run(["mke2fs", "-q", "-t", "ext4", "-U", uuid, "-L", "cloudimg-rootfs", "-E", f"offset={offset}",
          "-d", str(root), str(disk), f"{size // 1024}k"])


# The EFI system partition's grub.cfg, as Debian's grub-install writes it beside grub: find the
# root filesystem by UUID and read the real configuration there.
ESP_GRUB_CFG = """\
search --no-floppy --fs-uuid --set=root {uuid}
set prefix=($root)/boot/grub
configfile $prefix/grub.cfg
"""
EFI_MODULES = ["part_gpt", "part_msdos", "fat", "ext2", "search", "search_fs_uuid", "configfile", "normal",
               "linux", "echo", "test", "serial", "terminal", "efi_gop", "all_video", "gzio", "boot"]
ESP_MIB = 32
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


def _efi_system_partition(root: Path, work: Path, uuid: str) -> Path:
    """A FAT image for the EFI system partition, made from a file with mtools: grub as
    \\EFI\\BOOT\\BOOTX64.EFI (the removable path firmware boots with no boot entry in its NVRAM,
    as grub-install --removable puts it) and a grub.cfg pointing at the root filesystem."""
    _run(["chroot", str(root), "grub-mkimage", "-O", "x86_64-efi", "-o", "/BOOTX64.EFI",
          "-p", "/EFI/BOOT", *EFI_MODULES])
    modules = root / "boot/grub/x86_64-efi"          # what grub-install copies beside grub.cfg
    modules.mkdir(parents=True, exist_ok=True)
    for path in (root / "usr/lib/grub/x86_64-efi").iterdir():
        if path.suffix in (".mod", ".lst"):
            shutil.copyfile(path, modules / path.name)
    loader = work / "BOOTX64.EFI"
    shutil.move(str(root / "BOOTX64.EFI"), loader)
    cfg = work / "esp-grub.cfg"
    cfg.write_text(ESP_GRUB_CFG.format(uuid=uuid))
    esp = work / "esp.raw"
    sectors = ESP_MIB * 2048
    _run(["truncate", "-s", f"{ESP_MIB}M", str(esp)])
    _run(["mformat", "-i", str(esp), "-T", str(sectors), "-h", "64", "-s", "32", "-H", "2048",
          "-v", "EFI", "::"])
    _run(["mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT"])
    _run(["mcopy", "-i", str(esp), str(loader), "::/EFI/BOOT/BOOTX64.EFI"])
    _run(["mcopy", "-i", str(esp), str(cfg), "::/EFI/BOOT/grub.cfg"])
    return esp


def _write_gpt_table(raw: Path, size: int, esp: Path) -> None:
    """GPT: the EFI system partition at 1 MiB (written here), the root filesystem after it (at
    root_fs_offset), 1 MiB left at the end for the backup table."""
    root_start = root_fs_offset("gpt-esp") // 512
    root_sectors = (size // 512) - root_start - 2048
    _run(["sfdisk", "-q", str(raw)], input=(
        "label: gpt\n"
        f"start=2048, size={ESP_MIB * 2048}, type={ESP_TYPE}, name=\"EFI System\"\n"
        f"start={root_start}, size={root_sectors}, type={LINUX_TYPE}, name=root\n"))
    _run(["dd", f"if={esp}", f"of={raw}", "bs=1M", "seek=1", "conv=notrunc", "status=none"])


def root_fs_offset(layout: str) -> int:
    """Where the root partition begins on a disk of `layout`."""
    return (1 + ESP_MIB) * 2 ** 20 if layout == "gpt-esp" else 2 ** 20


def root_fs_bytes(recipe: dict) -> int:
    """The root partition's size: the disk less what lies before it (and on GPT the backup table's MiB)."""
    layout = recipe.get("layout", "mbr")
    return recipe["disk_gib"] * 2 ** 30 - root_fs_offset(layout) - (2 ** 20 if layout == "gpt-esp" else 0)


def build(recipe: dict = BOOKWORM_BIOS) -> Path:
    """The image's qcow2 in the test cache, built now if absent. Root only (debootstrap, chroot).

    No loop devices or mounts: the root filesystem is made with `mke2fs -d` (or, for an XFS
    root, `mkfs.xfs -p` from a prototype file: xfsproto.py), the partition
    table with sfdisk, grub's boot code and core image written where grub-install puts them
    (MBR, then the gap before the first partition at 1 MiB)."""
    key = recipe_hash(recipe)
    out = CACHE / f"{recipe['name']}-{key}.qcow2"
    if out.exists():
        return out
    if os.geteuid() != 0:
        raise RuntimeError("building the stock test image needs root")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "build.lock", "a") as lock:     # tests in parallel: one build at a time (shared trees, debs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():                          # not built by another test while this one waited
            _build(recipe, out)
    return out


def _build(recipe: dict, out: Path) -> None:
    """The image's root is its recipe's tree seen through an overlay whose upper layer takes the
    image's changes (a copy of the tree per image cost more CPU than the rest of its build). The
    overlay is mounted in a mount namespace of the build's own (`--assemble` in a child under
    unshare), so the mount ends with it however the build ends, and the tree is never written."""
    tree = CACHE / f"tree-{tree_hash(recipe)}"
    _debootstrap(recipe, tree)
    work = Path(tempfile.mkdtemp(prefix="stock-build-", dir=str(CACHE)))
    try:
        assembled = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
                                    "tests.integration.stockimage", "--assemble", json.dumps(recipe), str(tree),
                                    str(work)], cwd=REPO_ROOT)
        if assembled.returncode != 0:
            raise RuntimeError(f"building the stock image {recipe['name']} failed ({assembled.returncode}; "
                               "its output is above)")
        os.replace(work / "disk.qcow2", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _say(f"built {out}")


def _assemble(recipe: dict, tree: Path, work: Path) -> None:
    """work/disk.qcow2 from `tree` (unchanged) and `recipe`; in a mount namespace of its own."""
    if any(c in str(path) for path in (tree, work) for c in ",:"):
        raise RuntimeError(f"{tree} or {work} has a comma or colon, which an overlay's options cannot hold")
    root, upper, scratch = work / "root", work / "upper", work / "overlay-work"
    for path in (root, upper, scratch):
        path.mkdir()
    _run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={tree},upperdir={upper},workdir={scratch}",
          str(root)])
    uuid = str(uuidlib.uuid4())
    rootfs = recipe.get("rootfs", "ext4")
    layout = recipe.get("layout", "mbr")
    _configure(root, uuid, rootfs, layout)
    for inside, text in recipe.get("files", {}).items():
        (root / inside).parent.mkdir(parents=True, exist_ok=True)
        (root / inside).write_text(text)
    if recipe.get("purge"):
        _say(f"removing {', '.join(recipe['purge'])}")
        _run(["chroot", str(root), "dpkg", "--purge", *recipe["purge"]],
             env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if recipe.get("bake_agent"):
        from vmloader.bootstrapper import agentkit
        _say("baking vmloader's agent in (images agent-kit, install.sh)")
        agentkit.write_kit(work / "kit")
        _run(["sh", str(work / "kit" / "install.sh"), str(root)])
    if layout == "gpt-esp":
        esp = _efi_system_partition(root, work, uuid)
    else:
        boot, core = _grub_mbr(root, rootfs)
    size = recipe["disk_gib"] * 2 ** 30
    raw = work / "disk.raw"
    _run(["truncate", "-s", str(size), str(raw)])
    if layout == "gpt-esp":
        _write_gpt_table(raw, size, esp)
    else:
        _run(["sfdisk", "-q", str(raw)], input="label: dos\nstart=2048, type=83, bootable\n")
        with open(raw, "r+b") as disk:
            disk.write(boot)
            disk.seek(512)
            disk.write(core)
    _say(f"writing the {rootfs} root filesystem")
    _root_filesystem(rootfs, root, raw, root_fs_offset(layout), root_fs_bytes(recipe), uuid, work)
    _say("converting to qcow2")
    tmp = work / "disk.qcow2"
    _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(tmp)])
    os.chmod(tmp, 0o644)


# In the order the tests first need them (test_stock_delivery.py, then test_condor_site.py and
# test_stock_images.py, test_stock_bad_input.py): prepare() builds them so, each recipe's tree just
# before its first image.
RECIPES = {recipe["name"]: recipe for recipe in (BOOKWORM_BIOS_BARE, BOOKWORM_BIOS_BAKED, BOOKWORM_BIOS_XFS_QGA_ONLY,
                                                  BOOKWORM_BIOS_QGA_NO_EXEC, BOOKWORM_BIOS_QGA_ONLY, BOOKWORM_BIOS,
                                                  BOOKWORM_BIOS_CLOUD_INIT_NO_SEED, TRIXIE_UEFI)}


def prepare() -> None:
    """Every image in RECIPES, in the order the tests need them. `make test` begins this once its own
    image is built (scripts/prepare-test-images): on a fresh machine the stock tests would
    otherwise build each image (and first its tree: the long, mostly network-bound part) one
    after the other on their one worker, between their boots. Each build takes the build lock,
    so a test needing an image meanwhile waits for the build under way and then finds its own."""
    for recipe in RECIPES.values():
        build(recipe)


if __name__ == "__main__":
    if sys.argv[1:] == ["--prepare"]:
        prepare()
    elif sys.argv[1:2] == ["--assemble"]:
        _assemble(json.loads(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        print(build(RECIPES[sys.argv[1]] if len(sys.argv) > 1 else BOOKWORM_BIOS))

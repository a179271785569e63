"""A small initramfs for our own images: load the few virtio modules, mount the root, hand over.

The distribution's initramfs (initramfs-tools) starts udev, waits for it to settle and runs a
long shell library before the root is mounted: most of the time between the kernel and our
init. Our guests always have the same virtual hardware, so an archive of klibc's tiny tools
(already in the tree: initramfs-tools depends on klibc-utils), the modules virtio disks need
and a twenty-line /init does the same job. Built on the host from the image's own tree, as a
deterministic newc cpio (no cpio binary, no root, no mounts). Where klibc has no insmod (before
bookworm's klibc-utils 2.0.10), the tree's own kmod goes in as insmod with the libraries it loads
(elfdeps.py). When the tree lacks something (no klibc, no kmod, modules compressed in a way we do
not unpack), the distribution's initrd is kept.
"""
import gzip
import lzma
import stat
from pathlib import Path
from typing import Dict, Optional

from . import elfdeps

VERSION = "4"           # part of the image key: a change here rebuilds images
# Loaded in this order (dependencies first, built-in ones skipped): the disk and its filesystem,
# then what guest-setup would otherwise modprobe one by one in the booted system.
MODULES = ("virtio_pci", "virtio_blk", "ext4", "virtio_console", "virtio_net", "virtio_rng")
NEEDED = ("virtio_pci", "virtio_blk")          # without these the root cannot be mounted
TOOLS = ("sh", "mount", "umount", "mkdir", "sleep", "run-init")       # klibc's, and its insmod if it has one
KMOD = ("sbin/insmod", "usr/sbin/insmod", "bin/kmod", "usr/bin/kmod")   # where a tree has kmod's insmod

INIT = """#!/bin/sh
# vmloader initramfs /init: load the virtio modules, mount the root named on the kernel
# command line, move /dev over (and for vmloader-init mount the rest) and run the real init there. No udev: virtio devices are
# already on the bus when their driver loads, and devtmpfs makes their nodes.
PATH=/bin
export PATH
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
{insmods}
root=/dev/vda init=/sbin/init mode=ro fstype=ext4
read -r cmdline < /proc/cmdline
for word in $cmdline; do
  case "$word" in
    root=/dev/*) root="${{word#root=}}" ;;
    init=*) init="${{word#init=}}" ;;
    rootfstype=*) fstype="${{word#rootfstype=}}" ;;
    rw) mode=rw ;;
    ro) mode=ro ;;
  esac
done
tries=0
while [ ! -b "$root" ] && [ $tries -lt 1000 ]; do
  sleep 0.01
  tries=$((tries + 1))
done
if ! mount -t "$fstype" -o "$mode" "$root" /root; then
  echo "vmloader-initramfs: cannot mount the root $root ($fstype): the kernel panics next"
  exit 1
fi
mount -o move /dev /root/dev
case "$init" in
  */vmloader-init)
    # What vmloader-init and guest-setup would mount next, mounted here: klibc's static tools
    # take a few ms each under TCG, the root's dynamically linked mount about 0.07 s.
    mount -o move /proc /root/proc
    mount -t sysfs sysfs /root/sys
    mkdir -p /root/dev/pts /root/dev/shm
    mount -t devpts -o gid=5,mode=620 devpts /root/dev/pts
    mount -t tmpfs -o mode=1777 tmpfs /root/dev/shm
    mount -t tmpfs -o mode=755 tmpfs /root/run
    mount -t tmpfs -o mode=1777 tmpfs /root/tmp
    ;;
  *)
    umount /proc ;;
esac
exec run-init /root "$init" "$@"
"""


def _module_index(modules: Path) -> dict:
    """name -> (path relative to `modules`, [dependency paths]) from modules.dep."""
    index = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        path, _, deps = line.partition(":")
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        index[name] = (path, deps.split())
    return index


def _load_order(modules: Path, wanted: tuple) -> Optional[list]:
    """Module files to insmod, dependencies first; None when a needed one is missing."""
    index = _module_index(modules)
    builtin = {Path(p).name.split(".ko")[0].replace("-", "_")
               for p in (modules / "modules.builtin").read_text().split()} \
        if (modules / "modules.builtin").exists() else set()
    order: list = []
    for name in wanted:
        if name in builtin:
            continue
        if name not in index:
            if name in NEEDED:
                return None
            continue
        path, deps = index[name]
        for dep in reversed(deps):      # modules.dep lists the nearest dependency first
            if dep not in order:
                order.append(dep)
        if path not in order:
            order.append(path)
    return order


def _module_bytes(path: Path) -> Optional[bytes]:
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    return None                            # .ko.zst: no zstd in the stdlib here


class _Cpio:
    """A newc archive, every entry owned by root with mtime 0: the same tree gives the same bytes."""

    def __init__(self) -> None:
        self.parts: list = []
        self.inode = 0
        self.directories: set = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple = (0, 0)) -> None:
        self.inode += 1
        fields = (self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self.parts.append(_pad(header + name.encode() + b"\0"))
        self.parts.append(_pad(data))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)
        self.directories.add(name)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        parts = name.split("/")[:-1]
        for depth in range(1, len(parts) + 1):         # its directories first (the kernel makes none)
            if "/".join(parts[:depth]) not in self.directories:
                self.directory("/".join(parts[:depth]))
        self._entry(name, stat.S_IFREG | mode, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _insmod(root: Path, tools: Path) -> Optional[Dict[str, bytes]]:
    """The archive's insmod, {path: bytes}: klibc's, or the tree's kmod (which acts as insmod by the
    name it is run as) with its loader and libraries; None if the tree has neither."""
    if (tools / "insmod").is_file():
        return {"bin/insmod": (tools / "insmod").read_bytes()}
    kmod = next((found for found in (elfdeps.inside(root, name) for name in KMOD) if found), None)
    if kmod is None:
        return None
    program = kmod.read_bytes()
    needs = elfdeps.libraries(root, program)
    return None if needs is None else {"bin/insmod": program, **needs}


def build(root: Path, kernel_version: str, out: Path) -> bool:
    """Write the initramfs for the tree at `root` to `out`; False (nothing written) if the tree
    cannot have one and the distribution's initrd must stay."""
    klibc = sorted((root / "usr/lib").glob("klibc-*.so"))
    tools = root / "usr/lib/klibc/bin"
    modules = root / "lib/modules" / kernel_version
    if not klibc or not all((tools / t).is_file() for t in TOOLS) or not (modules / "modules.dep").is_file():
        return False
    order = _load_order(modules, MODULES)
    insmod = _insmod(root, tools)
    if order is None or insmod is None:
        return False
    archive = _Cpio()
    for name in ("bin", "dev", "proc", "root", "lib", "lib/modules", "usr", "usr/lib"):
        archive.directory(name)
    archive.char_device("dev/console", 5, 1)
    for where in ("lib/", "usr/lib/"):      # the tools' ELF interpreter: /lib/klibc-* or, merged, /usr/lib/
        archive.file(where + klibc[-1].name, klibc[-1].read_bytes(), 0o755)
    for tool in TOOLS:
        archive.file("bin/" + tool, (tools / tool).read_bytes(), 0o755)
    for name in sorted(insmod):
        archive.file(name, insmod[name], 0o755)
    insmods = []
    for rel in order:
        data = _module_bytes(modules / rel)
        if data is None:
            return False
        name = Path(rel).name.split(".ko")[0] + ".ko"
        archive.file("lib/modules/" + name, data)
        insmods.append("insmod /lib/modules/" + name)
    archive.file("init", INIT.format(insmods="\n".join(insmods)).encode(), 0o755)
    out.write_bytes(archive.bytes())
    return True

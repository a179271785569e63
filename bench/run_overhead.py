#!/usr/bin/env python3
"""Benchmark: what vmloader adds on top of booting the guest.

Measures, side by side in one run, the wall time of
`vmloader run --cold --image debian-12 -- true` (booted) (with its phase breakdown from
--json) and two bare `qemu-system-x86_64` boots-to-poweroff of the same kernel on the same base
disk: one as the job boots (Q35, the image's initrd and command line), and issue 11's baseline
(i440FX, the distribution's initramfs-tools initrd from the image's tree, the command line the
images had then). Then prints the ratios. Not a test: no thresholds, just figures (write them
into the README).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from vmloader.bootstrapper import build, config
from vmloader.bootstrapper.cache import ImageCache

PASSED_ENV = ("PYTHONPATH", "VMLOADER_CACHE_DIR", "VMLOADER_CONFIG")   # which vmloader, which cache
POWEROFF = 'init=/bin/sh -- -c "mount -t proc proc /proc; echo o > /proc/sysrq-trigger; sleep 30"'


# The command line of the images when issue 11 measured its baseline (4.33 s then).
ISSUE_CMDLINE = "root=/dev/vda rw console=ttyS0 quiet no_timer_check"


def bare_boot(image, accel: str, initrd=None, machine: str = "q35", cmdline=None) -> float:
    cmdline = (cmdline or image.entry.cmdline).replace("init=/sbin/vmloader-init", "").strip() + " " + POWEROFF
    argv = ["qemu-system-x86_64", "-accel", accel, "-machine", machine, "-m", str(image.entry.memory_mib),
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "null", "-kernel", str(image.kernel),
            "-initrd", str(initrd or image.initrd), "-append", cmdline,
            "-drive", f"file={image.disk},if=virtio,format=qcow2,snapshot=on,readonly=off"]
    started = time.monotonic()
    subprocess.run(argv, check=True, timeout=300, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def distribution_initrd(cache_dir: Path, entry) -> Optional[Path]:
    """initramfs-tools' initrd in the image's debootstrap tree (None: no tree in this cache)."""
    if entry.recipe is None:
        return None
    found = sorted((build.tree_path(cache_dir, entry.recipe) / "boot").glob("initrd.img-*"))
    return found[-1] if found else None


def vmloader_run(state: Path) -> tuple:
    env = {"VMLOADER_STATE_DIR": str(state), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    env.update({k: v for k, v in os.environ.items() if k in PASSED_ENV})
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12",
                          "--snapshot", "never", "--cold", "--json", "--", "true"],
                         stdout=subprocess.PIPE, check=True, env=env, timeout=600).stdout
    return time.monotonic() - started, json.loads(out)["timings"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accel", default="tcg", help="accelerator for the bare boot (tcg here: KVM is PVM)")
    parser.add_argument("--bare-initrd", type=Path,
                        help="initrd for issue 11's baseline instead of the one found in the image's tree")
    args = parser.parse_args()
    cache_dir = config.load().cache_dir
    image = ImageCache(cache_dir).resolve("debian-12")
    issue_initrd = args.bare_initrd or distribution_initrd(cache_dir, image.entry)
    bare, issue, wrapped, phases = [], [], [], []
    with tempfile.TemporaryDirectory() as state:
        for _ in range(args.rounds):
            bare.append(bare_boot(image, args.accel))
            if issue_initrd:
                issue.append(bare_boot(image, args.accel, issue_initrd, machine="pc", cmdline=ISSUE_CMDLINE))
            seconds, timings = vmloader_run(Path(state))
            wrapped.append(seconds)
            phases.append(timings)
    run = statistics.median(wrapped)
    print(f"image {image.entry.ref}, {args.rounds} rounds, medians:")
    print(f"  bare qemu boot-to-poweroff, as the job boots     : {statistics.median(bare):6.2f} s"
          f"  (q35, the image's initrd and command line)")
    if issue and issue_initrd:
        print(f"  bare qemu boot-to-poweroff, issue 11's baseline : {statistics.median(issue):6.2f} s"
              f"  (pc, {issue_initrd.name}, {ISSUE_CMDLINE!r})")
    print(f"  vmloader run --cold -- true                     : {run:6.2f} s")
    print(f"  ratio to the bare boot as the job boots         : {run / statistics.median(bare):6.2f}x")
    if issue:
        print(f"  ratio to issue 11's baseline                    : {run / statistics.median(issue):6.2f}x")
    print("  phases (median s):")
    for name in phases[0]:
        print(f"    {name:14} {statistics.median(p.get(name, 0.0) for p in phases):6.2f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark: what vmloader adds on top of booting the guest.

Measures, side by side in one run, the wall time of
`vmloader run --cold --image debian-12 -- true` (booted) (with its phase breakdown from
--json) and a bare `qemu-system-x86_64` boot-to-poweroff of the same kernel
and initrd on the same base disk, then prints the ratio. Not a test: no
thresholds, just figures (write them into the README).
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

from vmloader.bootstrapper import config
from vmloader.bootstrapper.cache import ImageCache

PASSED_ENV = ("PYTHONPATH", "VMLOADER_CACHE_DIR", "VMLOADER_CONFIG")   # which vmloader, which cache
POWEROFF = 'init=/bin/sh -- -c "mount -t proc proc /proc; echo o > /proc/sysrq-trigger; sleep 30"'


def bare_boot(image, accel: str, initrd=None) -> float:
    cmdline = image.entry.cmdline.replace("init=/sbin/vmloader-init", "").strip() + " " + POWEROFF
    argv = ["qemu-system-x86_64", "-accel", accel, "-m", str(image.entry.memory_mib), "-nographic",
            "-no-reboot", "-nodefaults", "-serial", "null", "-kernel", str(image.kernel),
            "-initrd", str(initrd or image.initrd), "-append", cmdline,
            "-drive", f"file={image.disk},if=virtio,format=qcow2,snapshot=on,readonly=off"]
    started = time.monotonic()
    subprocess.run(argv, check=True, timeout=300, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


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
                        help="initrd for the bare boot instead of the image's (e.g. the distribution's "
                             "initramfs-tools one from the image tree's /boot: the issue-11 baseline)")
    args = parser.parse_args()
    image = ImageCache(config.load().cache_dir).resolve("debian-12")
    bare, wrapped, phases = [], [], []
    with tempfile.TemporaryDirectory() as state:
        for _ in range(args.rounds):
            bare.append(bare_boot(image, args.accel, args.bare_initrd))
            seconds, timings = vmloader_run(Path(state))
            wrapped.append(seconds)
            phases.append(timings)
    print(f"image {image.entry.ref}, {args.rounds} rounds, medians:")
    print(f"  bare qemu boot-to-poweroff : {statistics.median(bare):6.2f} s"
          f"  (initrd {args.bare_initrd or 'of the image'})")
    print(f"  vmloader run -- true       : {statistics.median(wrapped):6.2f} s")
    print(f"  ratio                      : {statistics.median(wrapped) / statistics.median(bare):6.2f}x")
    print("  phases (median s):")
    for name in phases[0]:
        print(f"    {name:14} {statistics.median(p.get(name, 0.0) for p in phases):6.2f}")


if __name__ == "__main__":
    main()

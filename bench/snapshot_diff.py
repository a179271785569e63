#!/usr/bin/env python3
"""Benchmark: `snapshot diff` of the debian-12 image, read in user space.

A qcow2 layer over the cached debian-12 base stands in for a kept snapshot (the
work is the same: both chains are converted, replayed and listed whole). Reports
the whole read (guestdisk.read_trees) as the caller and, when run as root, with
the parsers dropped to nobody, and the parts: qemu-img convert of one chain and
the debugfs listing of one tree. Not a test: no thresholds, just figures.
"""
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmloader.bootstrapper import config, guestdisk  # noqa: E402
from vmloader.bootstrapper.cache import ImageCache  # noqa: E402


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def parts(base: Path, identity) -> tuple:
    with tempfile.TemporaryDirectory(prefix="vmloader-bench-") as work:
        reader = guestdisk.Reader(guestdisk.scratch_dir(Path(work), identity), identity)
        layer = guestdisk.stage(reader, base, "base.qcow2", "base image")
        convert = timed(lambda: reader.to_raw([layer], "base.raw"))
        reader.replay_journal("base.raw")
        tree = {}
        listing = timed(lambda: tree.update(reader.list_tree("base.raw", "base")))
        return convert, listing, len(tree)


def main(rounds: int = 3) -> None:
    base = ImageCache(config.load().cache_dir).resolve("debian-12").disk
    who = [("as the caller", None)] + ([("as nobody", guestdisk.parser_identity())] if
                                       guestdisk.parser_identity() else [])
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        snap = Path(tmp) / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(snap)],
                       check=True)
        for label, identity in who:
            whole = [timed(lambda: guestdisk.read_trees(base, snap, "bench", identity)) for _ in range(rounds)]
            split = [parts(base, identity) for _ in range(rounds)]
            print(f"{label:14} whole diff read {statistics.median(whole):5.2f} s; one chain: convert "
                  f"{statistics.median(s[0] for s in split):5.2f} s, debugfs listing "
                  f"{statistics.median(s[1] for s in split):5.2f} s ({split[0][2]} entries) "
                  f"(medians of {rounds})")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark: time to preserve a job's state and to revert to the clean image.

Preserving is `SnapshotStore.preserve` (the overlay is renamed into the store);
reverting is creating the next job's fresh overlay on the base (`qemu-img
create -b`). Both should be flat in the base size: measured for a 1 GiB and a
10 GiB base, each with 64 MiB written into the job's overlay. Not a test: no
thresholds (goal: <= 100 ms), just figures.
"""
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmloader.bootstrapper.snapshots import SnapshotMeta, SnapshotStore  # noqa: E402


def qemu_img(*args) -> None:
    subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.DEVNULL)


def one_round(work: Path, base: Path, store: SnapshotStore, n: int) -> tuple:
    overlay = work / f"overlay-{n}.qcow2"
    started = time.perf_counter()
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay))
    revert = time.perf_counter() - started
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64M", str(overlay)], check=True,
                   stdout=subprocess.DEVNULL)
    meta = SnapshotMeta(id=f"bench-{n}", created=time.time(), image="bench", image_sha256="0" * 64,
                        base_path=str(base), command=["true"], exit_status=1, outcome="failed",
                        user="bench", hostname="bench")
    started = time.perf_counter()
    store.preserve(meta, overlay, None)
    preserve = time.perf_counter() - started
    return preserve, revert


def main() -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:  # base data: the first GiB written
        work = Path(tmp)
        for gib in (1, 10):
            base = work / f"base-{gib}g.qcow2"
            qemu_img("create", "-q", "-f", "qcow2", str(base), f"{gib}G")
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1023M", str(base)],
                           check=True, stdout=subprocess.DEVNULL)
            store = SnapshotStore(work / f"store-{gib}")
            rounds = [one_round(work, base, store, n) for n in range(5)]
            preserve = statistics.median(r[0] for r in rounds) * 1000
            revert = statistics.median(r[1] for r in rounds) * 1000
            print(f"{gib:>2} GiB base: preserve {preserve:6.1f} ms, revert (fresh overlay) {revert:6.1f} ms "
                  f"(medians of {len(rounds)})")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark: a job restored from a warm state beside a cold boot and a bare QEMU boot.

Measures, side by side in one run (all with `--network none`, a shape of its own so the
states it drops and builds are its own): building the warm state (`vmloader images warm`)
and its size on disk; `vmloader run -- true` restored warm, booted cold (`--cold`), and a
bare `qemu-system-x86_64` boot-to-poweroff of the same kernel and initrd; the warm run's
phases (restore = libvirt restore + the agent's hello: the floor of a warm start; identity =
reseed, hostname, machine-id, clock); N concurrent warm jobs (default 4, on this machine's cores):
their lanes are built first (one saved state per concurrent job, built on demand), then the
makespan of N `run -- true` started at once; and the Vagrant peer (the same `true` through
Vagrant + vagrant-libvirt, measured once on this kind of machine). Not a test: no thresholds,
just figures.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmloader.bootstrapper import config, warm
from vmloader.bootstrapper.cache import ImageCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_overhead import bare_boot  # noqa: E402

SHAPE = ("--network", "none")
VAGRANT_S = 47.7          # the same `true` through Vagrant + vagrant-libvirt, same base tree (issue 11)


def _env(state: Path) -> dict:
    env = {"VMLOADER_STATE_DIR": str(state), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "VMLOADER_WARM_START": "true"}
    for name in ("VMLOADER_CACHE_DIR", "PYTHONPATH"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def cli(state: Path, *args: str) -> tuple:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", *args], stdout=subprocess.PIPE,
                         check=True, env=_env(state), timeout=900).stdout
    return time.monotonic() - started, json.loads(out)


def cli_at_once(state: Path, count: int, *args: str) -> tuple:
    """`count` CLI runs started together: (seconds until the last one ended, their JSON results)."""
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "vmloader.bootstrapper.cli", *args], stdout=subprocess.PIPE,
                              env=_env(state)) for _ in range(count)]
    outs = [proc.communicate(timeout=1800)[0] for proc in procs]
    return time.monotonic() - started, [json.loads(out) for out in outs]


def lanes_built(state: Path) -> int:
    _, listing = cli(state, "images", "list", "--json")
    return sum(w["lanes"] for row in listing if row["name"] == "debian-12" for w in row["warm"]
               if w["network"] == "none")


def concurrent(state: Path, count: int, rounds: int) -> tuple:
    """Build `count` lanes (concurrent jobs build the lanes they find missing), then time `count`
    warm jobs started at once: (makespans, how many of the timed jobs started warm)."""
    job = ("run", "--image", "debian-12", *SHAPE, "--snapshot", "never", "--json", "--", "true")
    for _ in range(3):
        if lanes_built(state) >= count:
            break
        cli_at_once(state, count, *job)
    makespans, warm_starts = [], 0
    for _ in range(rounds):
        seconds, results = cli_at_once(state, count, *job)
        makespans.append(seconds)
        warm_starts += sum(r["start"] == "warm" for r in results)
    return makespans, warm_starts


def drop_states(network: str) -> None:
    store = warm.WarmStore(warm.warm_root(config.load()), 0)
    for state in list(store.states()):
        if (state["meta"].get("parts") or {}).get("network") == network:
            shutil.rmtree(state["lane"].dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accel", default="tcg")
    parser.add_argument("--concurrent", type=int, default=4, help="warm jobs started at once (0: skip)")
    args = parser.parse_args()
    image = ImageCache(config.load().cache_dir).resolve("debian-12")
    drop_states("none")
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        build_s, _ = cli(state, "images", "warm", "debian-12", *SHAPE, "--json")
        _, listing = cli(state, "images", "list", "--json")
        sizes = [w["bytes"] / w["lanes"] for row in listing if row["name"] == "debian-12" for w in row["warm"]
                 if w["network"] == "none"]
        warm_s, cold_s, bare_s, phases = [], [], [], []
        for _ in range(args.rounds):
            bare_s.append(bare_boot(image, args.accel))
            seconds, result = cli(state, "run", "--image", "debian-12", *SHAPE, "--snapshot", "never", "--json",
                                  "--", "true")
            assert result["start"] == "warm", result
            warm_s.append(seconds)
            phases.append(result["timings"])
            seconds, result = cli(state, "run", "--image", "debian-12", *SHAPE, "--cold", "--snapshot", "never",
                                  "--json", "--", "true")
            cold_s.append(seconds)
        makespans, warm_starts = concurrent(state, args.concurrent, args.rounds) if args.concurrent else ([], 0)
    med = statistics.median
    print(f"image {image.entry.ref}, {args.rounds} rounds, medians (network none):")
    print(f"  build the warm state (images warm)   : {build_s:6.2f} s, {sizes[0] / 2**20 if sizes else 0:.0f} MiB "
          f"on disk ({image.entry.memory_mib} MiB guest)")
    print(f"  vmloader run -- true, warm           : {med(warm_s):6.2f} s")
    print(f"  vmloader run -- true, cold (--cold)  : {med(cold_s):6.2f} s")
    print(f"  bare qemu boot-to-poweroff           : {med(bare_s):6.2f} s")
    print(f"  warm vs cold                         : {med(cold_s) / med(warm_s):6.2f}x faster")
    if makespans:
        label = f"{args.concurrent} concurrent warm jobs, makespan"
        print(f"  {label:37}: {med(makespans):6.2f} s on "
              f"{os.cpu_count()} cores ({warm_starts} of {args.concurrent * args.rounds} started warm)")
    print(f"  Vagrant + vagrant-libvirt (earlier)  : {VAGRANT_S:6.2f} s: warm vmloader "
          f"{VAGRANT_S / med(warm_s):.1f}x ahead, cold {VAGRANT_S / med(cold_s):.1f}x")
    print("  warm phases (median s; restore = the floor: libvirt restore + agent hello):")
    for name in sorted(phases[0]):
        print(f"    {name:14} {med(p.get(name, 0.0) for p in phases):6.2f}")


if __name__ == "__main__":
    main()

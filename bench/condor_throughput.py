#!/usr/bin/env python3
"""Benchmark: 20 short VM jobs through the 2-slot test pool.

Starts the same HTCondor pool the tests use (trixie chroot, two startds with one
slot each), times one VM job alone, then submits N jobs at once and reports
their makespan against the ideal N x single / slots (`x ideal`). With --compare-cgroups it
does so twice: with HTCondor's cgroup accounting and limits (the pool's default)
and without them (jobs tracked by process tree), for the cost of the accounting.
With --warm, each pool then runs the same jobs again after root warmed debian-12 in both
workers' caches (`images warm`, what a cache service with keep_warm does): jobs restore root's state
instead of booting (an HTCondor job never builds a state of its own).
Not a test: no thresholds, just figures for the README.
"""
import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.condor_pool import USER, start_pool  # noqa: E402

SUBMIT = ("executable = /bin/true\ntransfer_executable = false\nshould_transfer_files = YES\n"
          "log = log\n+VMImage = \"debian-12\"\n+VMLoaderSnapshot = \"never\"\nqueue {count}\n")


def run_cluster(pool, name: str, count: int) -> float:
    workdir = f"/home/{USER}/{name}"
    pool.run(["mkdir", "-p", workdir], check=True)
    pool.path(workdir + "/job.sub").write_text(SUBMIT.format(count=count))
    started = time.monotonic()
    out = pool.run(["condor_submit", "job.sub"], cwd=workdir, check=True).stdout
    cluster = re.search(r"submitted to cluster (\d+)", out).group(1)

    def finished():
        left = pool.run(["condor_q", "-allusers", cluster, "-af", "JobStatus"], user=None).stdout.split()
        if "5" in left:
            raise SystemExit(f"a job of cluster {cluster} was held: see condor_q -hold")
        return not left
    pool.wait_for(finished, 3600, f"cluster {cluster} to finish", interval=0.5)
    return time.monotonic() - started


CACHES = ("/var/cache/vmloader-1", "/var/cache/vmloader-2")


def warm_workers(pool) -> float:
    """Root's warm state of debian-12 in both workers' caches (the system libvirt daemon saves it)."""
    pool.wait_for(lambda: pool.path("/run/libvirt/libvirt-sock").exists(), 60, "the pool's libvirtd")
    started = time.monotonic()
    for cache in CACHES:
        pool.warm("debian-12", cache)
    return time.monotonic() - started


def starts(pool) -> dict:
    """How the pool's jobs so far started (job dir -> "warm"/"cold"), from their metadata."""
    jobs = pool.path(f"/home/{USER}/.local/share/vmloader/jobs")
    seen = {}
    for job in (jobs.iterdir() if jobs.is_dir() else ()):
        try:
            seen[job.name] = json.loads((job / "metadata.json").read_text()).get("start", "?")
        except (OSError, ValueError):
            pass
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--compare-cgroups", action="store_true",
                        help="also run without HTCondor's cgroup accounting and limits")
    parser.add_argument("--warm", action="store_true",
                        help="then run the jobs again from root's warm states (built with `images warm`)")
    args = parser.parse_args()
    results, rows = {}, []
    print(f"load average at the start: {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    for cgroups in ((True, False) if args.compare_cgroups else (True,)):
        what = "with cgroup limits" if cgroups else "without cgroups"
        pool = start_pool(cgroups=cgroups, keep_warm=False)      # cold first: root warms below
        try:
            run_cluster(pool, "warmup", 2)               # images into both workers' caches
            single = run_cluster(pool, "single", 1)
            makespan = run_cluster(pool, "batch", args.jobs)
            results[cgroups] = (single, makespan)
            rows.append((f"{what}, cold", single, makespan))
            print(f"{what}: one VM job alone {single:.1f} s, {args.jobs} VM jobs on 2 slots {makespan:.1f} s",
                  file=sys.stderr, flush=True)
            if args.warm:
                built = warm_workers(pool)
                before = set(starts(pool))
                single = run_cluster(pool, "warm-single", 1)
                makespan = run_cluster(pool, "warm-batch", args.jobs)
                kinds = [kind for name, kind in starts(pool).items() if name not in before]
                rows.append((f"{what}, warm", single, makespan))
                print(f"{what}: warm states built in {built:.1f} s (both workers); then one VM job alone "
                      f"{single:.1f} s, {args.jobs} VM jobs on 2 slots {makespan:.1f} s; "
                      f"{kinds.count('warm')}/{len(kinds)} jobs started warm", file=sys.stderr, flush=True)
        finally:
            pool.stop()
    # Side by side: the same pool, the same jobs (with and without HTCondor's cgroup accounting and
    # limits; booted, then restored from warm states).
    print(f"{'':<30} {'one job alone':>14} {f'{args.jobs} jobs, 2 slots':>18} {'x ideal':>8}")
    for what, single, makespan in rows:
        ideal = args.jobs * single / 2
        print(f"{what:<30} {single:>12.1f} s {makespan:>16.1f} s {makespan / ideal:>8.2f}")
    if False in results:
        with_, without = results[True][1], results[False][1]
        print(f"cgroup accounting and limits: {with_ - without:+.1f} s on the makespan "
              f"({(with_ - without) / args.jobs:+.2f} s per VM job, {100 * (with_ / without - 1):+.1f} %)")


if __name__ == "__main__":
    main()

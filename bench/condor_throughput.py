#!/usr/bin/env python3
"""Benchmark: 20 short VM jobs through the 2-slot test pool.

Starts the same HTCondor pool the tests use (trixie chroot, two startds with one
slot each), times one VM job alone, then submits N jobs at once and reports
their makespan against the ideal N x single / slots (`x ideal`). With --compare-cgroups it
does so twice: with HTCondor's cgroup accounting and limits (the pool's default)
and without them (jobs tracked by process tree), for the cost of the accounting.
Not a test: no thresholds, just figures for the README.
"""
import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--compare-cgroups", action="store_true",
                        help="also run without HTCondor's cgroup accounting and limits")
    args = parser.parse_args()
    results = {}
    for cgroups in ((True, False) if args.compare_cgroups else (True,)):
        pool = start_pool(cgroups=cgroups)
        try:
            run_cluster(pool, "warmup", 2)               # images into both workers' caches
            single = run_cluster(pool, "single", 1)
            makespan = run_cluster(pool, "batch", args.jobs)
        finally:
            pool.stop()
        results[cgroups] = (single, makespan)
        what = "with cgroup limits" if cgroups else "without cgroups"
        print(f"{what}: one VM job alone {single:.1f} s, {args.jobs} VM jobs on 2 slots {makespan:.1f} s",
              file=sys.stderr, flush=True)
    # Side by side: the same pool, the same jobs, with and without HTCondor's cgroup accounting and limits.
    rows = [("with cgroup limits", *results[True])]
    if False in results:
        rows.append(("without cgroups", *results[False]))
    print(f"{'':<20} {'one job alone':>14} {f'{args.jobs} jobs, 2 slots':>18} {'x ideal':>8}")
    for what, single, makespan in rows:
        ideal = args.jobs * single / 2
        print(f"{what:<20} {single:>12.1f} s {makespan:>16.1f} s {makespan / ideal:>8.2f}")
    if False in results:
        with_, without = results[True][1], results[False][1]
        print(f"cgroup accounting and limits: {with_ - without:+.1f} s on the makespan "
              f"({(with_ - without) / args.jobs:+.2f} s per VM job, {100 * (with_ / without - 1):+.1f} %)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark: image pull throughput against `curl -o` of the same file, and cache-hit lookup latency.

Publishes the built debian-12 image to a temporary repository, serves it with
Debian's nginx on loopback, then in one run: curl downloads the disk, and
`vmloader images pull` pulls the whole image (verification included) into an
empty cache. Goal: pull >= 0.9x curl's throughput. No thresholds enforced.
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.nginx import Nginx  # noqa: E402
from vmloader.bootstrapper import config, publish  # noqa: E402
from vmloader.bootstrapper.cache import ImageCache  # noqa: E402
from vmloader.bootstrapper.repository import DirectoryRepository, fetch_into_cache  # noqa: E402


def timed(argv, env=None) -> float:
    started = time.monotonic()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="vmloader-bench-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    try:
        repo = work / "repo"
        [entry] = publish.publish(ImageCache(config.load().cache_dir), repo, ["debian-12"])
        disk = entry.artifacts["disk"]
        server = Nginx(repo, work / "nginx").start()
        try:
            url = server.url + disk.url
            curl = timed(["curl", "-sf", "-o", str(work / "curl.out"), url])
            started = time.monotonic()
            fetch_into_cache(requests.Session(), url, disk, ImageCache(work / "lib-cache"), "disk")
            fetch = time.monotonic() - started
            env = dict(os.environ, VMLOADER_CACHE_DIR=str(work / "cache"), VMLOADER_REPOSITORY=server.url)
            pull = timed([sys.executable, "-m", "vmloader.bootstrapper.cli", "images", "pull", "debian-12"], env)
            total = sum(a.size for a in entry.artifacts.values())
            lookups = []
            for _ in range(50):
                started = time.perf_counter()
                ImageCache(work / "cache", [DirectoryRepository(repo)]).resolve("debian-12")
                lookups.append(time.perf_counter() - started)
        finally:
            server.stop()
        print(f"disk {disk.size / 2**20:.0f} MiB, whole image {total / 2**20:.0f} MiB, loopback nginx")
        print(f"  curl -o of the disk                     : {disk.size / 2**20 / curl:7.1f} MiB/s")
        print(f"  vmloader fetch of the disk (sha256 incl.): {disk.size / 2**20 / fetch:7.1f} MiB/s"
              f"  = {curl / fetch:.2f}x curl")
        print(f"  `vmloader images pull` whole image, CLI : {total / 2**20 / pull:7.1f} MiB/s"
              f"  (3 files, manifest, interpreter start-up)")
        print(f"  cache-hit lookup (median of 50): {statistics.median(lookups) * 1000:7.2f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

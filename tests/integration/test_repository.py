"""Image repositories over real HTTP: Debian's nginx on loopback, and `vmloader repo serve`."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests


from .conftest import as_user, ensure_user, world_readable_tmpdir
from .nginx import Nginx, free_port
from .squid import Squid

pytestmark = pytest.mark.integration


@pytest.fixture
def nginx(published_repo, tmp_path):
    server = Nginx(published_repo, tmp_path / "nginx").start()
    yield server
    server.stop()


@pytest.fixture
def fresh_cache():
    cache = world_readable_tmpdir("vmloader-cache-")
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


def pull(vm_env, cache: Path, repository: str, name="debian-12"):
    env = dict(vm_env, VMLOADER_CACHE_DIR=str(cache), VMLOADER_REPOSITORY=repository)
    return subprocess.Popen([sys.executable, "-m", "vmloader.bootstrapper.cli", "images", "pull", name, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def finish(proc) -> tuple:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def disk_gets(server: Nginx) -> list:
    return [line for line in server.requests_for("disk.qcow2") if '"GET ' in line]


def test_pull_through_nginx_verifies_caches_and_then_needs_no_download(vm_env, nginx, fresh_cache, built_image):
    code, out, err = finish(pull(vm_env, fresh_cache, nginx.url))
    assert code == 0, err
    paths = json.loads(out)
    assert Path(paths["disk"]).name == built_image.artifacts["disk"].sha256
    assert "100%" in err                                   # progress lines on a non-TTY stderr
    code, _, err = finish(pull(vm_env, fresh_cache, nginx.url))
    assert code == 0, err
    assert len(disk_gets(nginx)) == 1
    assert any('" 304 ' in line for line in nginx.requests_for("manifest.json"))


def test_four_concurrent_pulls_download_the_disk_once(vm_env, nginx, fresh_cache):
    procs = [pull(vm_env, fresh_cache, nginx.url) for _ in range(4)]
    results = [finish(p) for p in procs]
    assert [r[0] for r in results] == [0, 0, 0, 0], [r[2] for r in results]
    assert len(disk_gets(nginx)) == 1
    assert not list((fresh_cache / "tmp").glob("*.part"))


def test_an_interrupted_download_resumes_with_a_range_request(vm_env, published_repo, fresh_cache, tmp_path):
    server = Nginx(published_repo, tmp_path / "slow", rate="40m").start()
    proc = pull(vm_env, fresh_cache, server.url)
    try:
        time.sleep(3)
        server.stop()                                       # the repository dies mid-download
        time.sleep(1)
        server.start()                                      # and comes back on the same port
        code, out, err = finish(proc)
    finally:
        server.stop()
    assert code == 0, err
    assert any('" 206 ' in line for line in disk_gets(server)), server.access_log.read_text()


def test_a_file_whose_bytes_differ_from_the_manifest_is_refused(vm_env, published_repo, fresh_cache, tmp_path):
    repo = world_readable_tmpdir("vmloader-badrepo-")
    try:
        shutil.copytree(published_repo, repo, dirs_exist_ok=True)
        manifest = json.loads((repo / "manifest.json").read_text())
        kernel = manifest["images"][0]["artifacts"]["kernel"]
        path = repo / kernel["url"]
        data = bytearray(path.read_bytes())
        data[1000] ^= 0xFF
        path.write_bytes(bytes(data))
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "vmloader.bootstrapper.cli", "repo", "serve", str(repo),
                                   "--bind", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True)
        try:
            server.stdout.readline()
            code, _, err = finish(pull(vm_env, fresh_cache, f"http://127.0.0.1:{port}/"))
        finally:
            server.terminate()
            server.wait()
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    assert code == 125
    assert f"expected {kernel['sha256']}" in err and "got " in err
    assert not (fresh_cache / "artifacts" / kernel["sha256"]).exists()
    assert not list((fresh_cache / "tmp").glob("*.part"))


def test_a_url_that_404s_is_named(vm_env, published_repo, fresh_cache, tmp_path):
    repo = world_readable_tmpdir("vmloader-404repo-")
    try:
        shutil.copy(published_repo / "manifest.json", repo / "manifest.json")
        server = Nginx(repo, tmp_path / "n404").start()
        try:
            code, _, err = finish(pull(vm_env, fresh_cache, server.url))
        finally:
            server.stop()
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    assert code == 125 and "404" in err


def test_repo_serve_answers_range_and_conditional_requests(published_repo):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "vmloader.bootstrapper.cli", "repo", "serve",
                               str(published_repo), "--bind", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True)
    try:
        assert "serving" in server.stdout.readline()
        base = f"http://127.0.0.1:{port}/"
        first = requests.get(base + "manifest.json", timeout=10)
        etag = first.headers["ETag"]
        again = requests.get(base + "manifest.json", headers={"If-None-Match": etag}, timeout=10)
        assert again.status_code == 304
        kernel_url = json.loads(first.text)["images"][0]["artifacts"]["kernel"]["url"]
        part = requests.get(base + kernel_url, headers={"Range": "bytes=10-19"}, timeout=10)
        assert part.status_code == 206
        assert part.content == (published_repo / kernel_url).read_bytes()[10:20]
    finally:
        server.terminate()
        server.wait()


def test_a_worker_keeps_running_cached_images_while_the_repository_is_down(vm_env, nginx, fresh_cache):
    code, _, err = finish(pull(vm_env, fresh_cache, nginx.url))
    assert code == 0, err
    url = nginx.url
    nginx.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", nginx.port), timeout=1)
    env = dict(vm_env, VMLOADER_CACHE_DIR=str(fresh_cache), VMLOADER_REPOSITORY=url)
    run = subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12",
                          "--snapshot", "never", "--", "cat", "/etc/debian_version"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("12.")


@pytest.fixture
def tiny_disk():
    """A 32 MiB tmpfs as the cache: the image does not fit."""
    mount_point = world_readable_tmpdir("vmloader-full-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)
    mount_point.rmdir()


def test_a_disk_filling_up_during_a_download_is_named_and_leaves_no_partial_file(vm_env, nginx, tiny_disk):
    code, _, err = finish(pull(vm_env, tiny_disk, nginx.url))
    assert code == 125
    assert "disk filled up" in err and "partial file was removed" in err
    assert not list(tiny_disk.rglob("*.part"))
    assert not list((tiny_disk / "artifacts").iterdir())


def test_a_second_worker_pulling_through_squid_is_served_from_squids_cache(vm_env, nginx, tmp_path):
    squid = Squid(world_readable_tmpdir("vmloader-squid-")).start()
    workers = [world_readable_tmpdir("vmloader-worker-") for _ in range(2)]
    env = {k: v for k, v in vm_env.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env["HTTP_PROXY"] = squid.url
    try:
        for cache in workers:
            code, _, err = finish(pull(env, cache, nginx.url))
            assert code == 0, err
    finally:
        squid.stop()
        for cache in workers:
            shutil.rmtree(cache, ignore_errors=True)
    disk_lines = [line for line in squid.access_log.read_text().splitlines() if "disk.qcow2" in line]
    assert len(disk_lines) == 2
    # HIT, or REFRESH_UNMODIFIED (Squid revalidated and nginx said 304): either way the bytes came from Squid.
    status = disk_lines[1].split()[3]
    assert "HIT" in status or "REFRESH_UNMODIFIED" in status, disk_lines
    assert len([line for line in disk_gets(nginx) if '" 200 ' in line]) == 1   # the repository sent it once
    shutil.rmtree(squid.prefix, ignore_errors=True)


def run_url(vm_env, cache: Path, url: str, *extra):
    env = dict(vm_env, VMLOADER_CACHE_DIR=str(cache), VMLOADER_BOOT_TIMEOUT="20")
    env.pop("VMLOADER_REPOSITORY", None)
    return subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", url, *extra,
                           "--snapshot", "never", "--", "true"], capture_output=True, text=True, env=env, timeout=600)


def test_an_image_url_is_verified_by_its_sha256_file_cached_and_booted_by_firmware(vm_env, nginx, published_repo,
                                                                                     fresh_cache, built_image):
    disk = built_image.artifacts["disk"]
    [entry] = json.loads((published_repo / "manifest.json").read_text())["images"]
    relative = entry["artifacts"]["disk"]["url"]
    (published_repo / (relative + ".sha256")).write_text(f"{disk.sha256}  disk.qcow2\n")
    run = run_url(vm_env, fresh_cache, nginx.url + relative)
    # Our images boot a kernel directly and carry no boot loader, so firmware boot finds
    # nothing to boot: what this shows is the download, verification and firmware path.
    assert run.returncode == 125
    assert "never reached the agent" in run.stderr
    assert (fresh_cache / "artifacts" / disk.sha256).exists()
    assert len(disk_gets(nginx)) == 1


def test_an_image_url_with_the_wrong_sha256_is_refused_before_boot(vm_env, nginx, published_repo, fresh_cache):
    [entry] = json.loads((published_repo / "manifest.json").read_text())["images"]
    wrong = "0" * 64
    run = run_url(vm_env, fresh_cache, nginx.url + entry["artifacts"]["disk"]["url"], "--sha256", wrong)
    assert run.returncode == 125
    assert f"expected {wrong}" in run.stderr and "[cache lookup]" in run.stderr
    assert not list((fresh_cache / "artifacts").iterdir())


def test_two_users_share_one_group_writable_cache(nginx, readable_checkout):
    """Jobs of different users on one worker: one download, one copy, readable by all of them."""
    users = [ensure_user(name, ("vmloader-cache",)) for name in ("vmloader-share-a", "vmloader-share-b")]
    cache = world_readable_tmpdir("vmloader-shared-")
    try:
        shutil.chown(cache, group="vmloader-cache")
        os.chmod(cache, 0o2775)
        env = {"VMLOADER_CACHE_DIR": str(cache), "VMLOADER_REPOSITORY": nginx.url}
        pulls = [as_user(user, readable_checkout, ["images", "pull", "debian-12", "--json"], env) for user in users]
        results = [(p.communicate(timeout=600), p.returncode) for p in pulls]
        assert [code for _, code in results] == [0, 0], [err for (_, err), _ in results]
        assert len(disk_gets(nginx)) == 1
        disks = {json.loads(out)["disk"] for (out, _), _ in results}
        assert len(disks) == 1 and Path(disks.pop()).parent == cache / "artifacts"
        run = as_user(users[1], readable_checkout, ["run", "--image", "debian-12", "--snapshot", "never", "--",
                                                    "true"], env)
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
        prune = as_user(users[0], readable_checkout, ["images", "prune", "--max-bytes", "0", "--json"], env)
        out, err = prune.communicate(timeout=60)
        assert prune.returncode == 0, err
        assert len(json.loads(out)) == 3                     # user a evicts what b's job used, once b is done
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_an_exact_version_already_cached_needs_no_network_at_all(vm_env, nginx, fresh_cache, built_image):
    code, out, err = finish(pull(vm_env, fresh_cache, nginx.url))
    assert code == 0, err
    before = len(nginx.access_log.read_text().splitlines())
    code, _, err = finish(pull(vm_env, fresh_cache, nginx.url, name=f"debian-12@{built_image.version}"))
    assert code == 0, err
    assert len(nginx.access_log.read_text().splitlines()) == before     # not even the manifest was asked for


def test_a_snapshot_whose_base_was_evicted_gets_it_back_or_says_what_is_missing(vm_env, nginx, fresh_cache):
    env = dict(vm_env, VMLOADER_CACHE_DIR=str(fresh_cache), VMLOADER_REPOSITORY=nginx.url)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", *args], capture_output=True,
                              text=True, env=env, timeout=600)
    job = json.loads(cli("run", "--image", "debian-12", "--json", "--", "sh", "-c", "echo kept > made; exit 3").stdout)
    snap = job["snapshot"]
    assert cli("images", "rm", "debian-12").returncode == 0           # the base is evicted
    again = cli("snapshot", "exec", snap, "--", "cat", "made")
    assert again.returncode == 0 and again.stdout == "kept\n", again.stderr   # fetched again, by its sha256
    assert cli("images", "rm", "debian-12").returncode == 0
    nginx.stop()
    lost = cli("snapshot", "exec", snap, "--", "cat", "made")
    assert lost.returncode == 125, lost.stderr
    assert f"snapshot {snap} needs its base image debian-12@" in lost.stderr and "hint:" in lost.stderr, lost.stderr
    shown = json.loads(cli("snapshot", "show", snap, "--json").stdout)
    assert Path(shown["disk"]).is_file()                              # nothing deleted

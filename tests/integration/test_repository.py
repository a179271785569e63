"""Image repositories over real HTTP: Debian's nginx on loopback, and `vmloader repo serve`."""
import hashlib
import json
import os
import pickle
import sqlite3
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests


from .conftest import as_user, ensure_user, next_line, world_readable_tmpdir
from .faulttable import record_row
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
        deadline = time.monotonic() + 300                   # the disk is 16 MiB in (only it is that large)
        while not any(part.stat().st_size >= 16 << 20 for part in (fresh_cache / "tmp").glob("*.part")):
            assert proc.poll() is None and time.monotonic() < deadline, finish(proc)
            time.sleep(0.1)
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
            next_line(server, 120)
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
        assert "serving" in next_line(server, 120)
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
    # Our images boot a kernel directly and carry no boot loader, so SeaBIOS would find nothing
    # to boot: what this shows is the download, verification and caching, and that a disk with
    # no boot code fails before its VM (not at the boot timeout), naming why.
    assert run.returncode == 125
    assert "cannot boot with SeaBIOS: its first sector holds no boot code" in run.stderr, run.stderr
    assert (fresh_cache / "artifacts" / disk.sha256).exists()
    assert len(disk_gets(nginx)) == 1


def test_an_image_url_with_the_wrong_sha256_is_refused_before_boot(vm_env, nginx, published_repo, fresh_cache):
    [entry] = json.loads((published_repo / "manifest.json").read_text())["images"]
    wrong = "0" * 64
    run = run_url(vm_env, fresh_cache, nginx.url + entry["artifacts"]["disk"]["url"], "--sha256", wrong)
    assert run.returncode == 125
    assert f"expected {wrong}" in run.stderr and "[cache lookup]" in run.stderr
    assert not list((fresh_cache / "artifacts").iterdir())


class CacheService:
    """`vmloader cache serve` run by root on a root-owned cache, as a worker would run it."""

    def __init__(self, cache: Path, repository: str, log: Path):
        self.cache, self.log = cache, log
        env = dict(os.environ, VMLOADER_CACHE_DIR=str(cache), VMLOADER_REPOSITORY=repository)
        self.proc = subprocess.Popen([sys.executable, "-m", "vmloader.bootstrapper.cli", "cache", "serve",
                                      "--log", str(log)], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (cache / "service.sock").exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, log.read_text() if log.exists() else ""
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def forget_own_images(*users) -> None:
    """Each user's private cache (~/.cache/vmloader) from an earlier run would shadow the shared image."""
    for user in users:
        shutil.rmtree(Path(user.pw_dir) / ".cache" / "vmloader", ignore_errors=True)


def _sha_of(out: str) -> str:
    return Path(json.loads(out)["disk"]).name


def test_two_users_read_one_cache_that_only_its_owners_service_writes(nginx, readable_checkout, tmp_path):
    """Jobs of different users on one worker: one download by root's service, one copy readable by all,
    writable by none of them; a user's own `images add` of a shared name affects only that user."""
    users = [ensure_user(name) for name in ("vmlt-cache-a", "vmlt-cache-b")]
    forget_own_images(*users)
    cache = world_readable_tmpdir("vmloader-shared-")
    service = CacheService(cache, nginx.url, tmp_path / "service.log")
    env = {"VMLOADER_CACHE_DIR": str(cache), "VMLOADER_REPOSITORY": nginx.url}
    try:
        runs = [as_user(user, readable_checkout, ["run", "--image", "debian-12", "--snapshot", "never",
                                                  "--", "sh", "-c", "echo booted"], env) for user in users]
        results = [(p.communicate(timeout=900), p.returncode) for p in runs]
        assert [code for _, code in results] == [0, 0], [err for (_, err), _ in results]
        assert all("booted" in out for (out, _), _ in results)
        assert len(disk_gets(nginx)) == 1                         # one download for both users
        assert "uid " in service.log.read_text() and "resolve debian-12" in service.log.read_text()
        shared_sha = built_sha = _sha_of(_pull(users[1], readable_checkout, env))
        for directory in [cache] + [p for p in cache.iterdir() if p.is_dir()]:
            for user in users:                                    # nobody but root writes the shared cache
                planted = subprocess.run(["runuser", "-u", user.pw_name, "--", "ln", "-s", "/etc/passwd",
                                          str(directory / f"planted-{user.pw_name}")], capture_output=True, text=True)
                assert planted.returncode != 0 and "Permission denied" in planted.stderr, directory
        record_row("a cache user plants a symlink in the shared cache", 1, "refused", "",
                   "ln: Permission denied (every cache dir is root's, 0755)", "cache unchanged")
        own = world_readable_tmpdir("vmloader-own-")
        with open(own / "evil.raw", "wb") as raw:   # boot code (a jump to itself) and the MBR signature
            raw.truncate(64 << 20)
            raw.write(b"\xeb\xfe")
            raw.seek(510)
            raw.write(b"\x55\xaa")
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(own / "evil.raw"),
                        str(own / "evil.qcow2")], check=True)
        add = as_user(users[0], readable_checkout, ["images", "add", "debian-12", "--disk", str(own / "evil.qcow2"),
                                                    "--boot", "bios", "--json"], env)
        _, err = add.communicate(timeout=120)
        assert add.returncode == 0, err
        evil_sha = _sha_of(_pull(users[0], readable_checkout, env))
        assert evil_sha != shared_sha                             # its author gets its own image ...
        assert _sha_of(_pull(users[1], readable_checkout, env)) == built_sha      # ... nobody else does
        assert not (cache / "custom").exists() and not (cache / "artifacts" / evil_sha).exists()
        record_row("a user's images add shadows a shared image name", 0, "only its author sees it", "",
                   "the image went to the user's private cache (~/.cache/vmloader)", "shared cache unchanged")
        shutil.rmtree(own, ignore_errors=True)
    finally:
        service.stop()
        shutil.rmtree(cache, ignore_errors=True)
        forget_own_images(*users)


def _pull(user, checkout: Path, env: dict) -> str:
    proc = as_user(user, checkout, ["images", "pull", "debian-12", "--json"], env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


def test_an_old_shared_cache_with_planted_files_is_cleaned_and_nothing_planted_is_trusted(nginx, readable_checkout,
                                                                                        tmp_path):
    """A cache set up the old group-writable way, with what a hostile group member left in it: a pickle that
    would run a command, links aimed outside the cache, a forged stamp over a changed artifact."""
    cache = world_readable_tmpdir("vmloader-legacy-")
    user = ensure_user("vmlt-cache-a")
    forget_own_images(user)
    env = {"VMLOADER_CACHE_DIR": str(cache), "VMLOADER_REPOSITORY": nginx.url}
    service = CacheService(cache, nginx.url, tmp_path / "service.log")
    try:
        sha = _sha_of(_pull(user, readable_checkout, env))
    finally:
        service.stop()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    marker = tmp_path / "pickle-ran"
    os.chmod(cache, 0o2775)
    shutil.rmtree(cache / "index")
    (cache / "index").mkdir()
    db = sqlite3.connect(cache / "index" / "cache.db")
    db.execute("CREATE TABLE Cache (rowid INTEGER PRIMARY KEY, key BLOB, raw INTEGER, mode INTEGER, value BLOB)")
    db.execute("INSERT INTO Cache (key, raw, mode, value) VALUES (?, 1, 4, ?)",
               ("0" * 64, pickle.dumps(_Marker(marker))))
    db.commit()
    db.close()
    os.symlink(victim, cache / "tmp" / f"{'a' * 64}.part")
    os.symlink(victim, cache / "pins" / f"{'b' * 64}.lock")
    disk = cache / "artifacts" / sha
    os.chmod(disk, 0o644)
    with open(disk, "r+b") as handle:                          # changed bytes ...
        handle.write(b"X")
    os.chmod(disk, 0o444)
    stamp = cache / "verified" / sha
    st = os.lstat(disk)
    stamp.write_text(json.dumps([st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]))   # ... a forged stamp
    os.chown(stamp, user.pw_uid, user.pw_gid)
    refused = _pull_raw(user, readable_checkout, env)
    assert refused.returncode == 125 and "chmod -R go-w" in refused.stderr, refused.stderr   # a reader refuses it
    service = CacheService(cache, nginx.url, tmp_path / "service2.log")   # its owner tightens it
    try:
        again = _sha_of(_pull(user, readable_checkout, env))
    finally:
        service.stop()
    assert again == sha and hashlib.sha256(disk.read_bytes()).hexdigest() == sha   # re-hashed, fetched again
    assert len(disk_gets(nginx)) == 2
    assert not marker.exists() and victim.read_text() == "precious\n"
    assert not os.path.lexists(cache / "tmp" / f"{'a' * 64}.part") and oct(cache.stat().st_mode)[-4:] == "0755"
    record_row("a crafted pickle row in the shared cache's index", 0, "never unpickled", "",
               "the old index is discarded unread and rebuilt from the files", "no command ran")
    record_row("a forged stamp over a changed cached artifact", 0, "re-hashed, dropped, fetched again", "",
               "stamps count only when the cache's owner made them", "the image booted is the published one")
    record_row("symlinks planted for the cache's write paths (.part, lock, stamp, manifest)", 0, "refused",
               "cache lookup", "O_NOFOLLOW/O_EXCL and owner checks; an old cache is cleaned by its owner",
               "link targets unchanged")
    shutil.rmtree(cache, ignore_errors=True)


def _pull_raw(user, checkout: Path, env: dict) -> subprocess.CompletedProcess:
    proc = as_user(user, checkout, ["images", "pull", "debian-12", "--json"], env)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


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

"""Fixtures for tests that boot real VMs through libvirt + QEMU.

The guest image is built (or found up to date) in the real default cache,
so CI reuses it across runs; every test gets its own state dir (jobs and
snapshots) so they cannot see each other's leftovers.
"""
import concurrent.futures
import fcntl
import hashlib
import json
import os
import pty
import pwd
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from vmloader.bootstrapper import build, catalog, config, publish
from vmloader.bootstrapper.cache import ImageCache

IMAGE = "debian-12"


@dataclass
class Run:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def json(self) -> dict:
        return json.loads(self.stdout)


# `make test` runs whole modules on four workers, each taking the next module in collection order
# when it runs low (`--dist loadfile --no-loadscope-reorder`). The longest modules go first, so the
# long ones start at once and the short ones fill in beside them; otherwise the stock images,
# collected late, started once the others were done and ran alone. The HTCondor tests are two
# modules with a pool each, and the stock images three, so that no module alone sets the suite's length.
# (Measured in one run, each module's span on its worker: the stock delivery tests 10 min, the fault
# tests 7.5, each HTCondor module about 7.3, the warm-start tests 7, the stock images 6; started
# seventh, the fault tests ran alone for the suite's last minute.)
# On a fresh machine (CI's case) the systemd variant's module builds its image first (over 2 min),
# so it starts eighth, among the long ones.
LONGEST_FIRST = ("test_stock_delivery.py", "test_faults.py", "test_condor_site.py", "test_condor.py",
                 "test_warm_start.py", "test_stock_images.py", "test_stock_bad_input.py", "test_systemd_variant.py",
                 "test_snapshot_sessions.py", "test_run.py", "test_repository.py")


def pytest_collection_modifyitems(items) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)            # stable: a module's tests keep their order, the rest theirs


@pytest.fixture(scope="session")
def built_image():
    """The default image, built once into the shared cache (fast when up to date)."""
    cfg = config.load()
    cache = ImageCache(cfg.cache_dir)
    entry = catalog.load_manifest(catalog.EMBEDDED_MANIFEST).find(IMAGE)
    return build.build_image(entry, cache, progress=lambda m: print(m, file=sys.stderr))


def next_line(proc: subprocess.Popen, timeout: float = 900):
    """The next line of a running child's stdout. Past `timeout` the child is ended (SIGTERM:
    vmloader then ends its VM) and the test fails, never waiting for ever on a child that
    stopped printing."""
    box: list = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box:
        proc.terminate()
        reader.join(60)
        pytest.fail(f"{proc.args[:6]}... printed no line within {timeout:.0f} s")
    return box[0]


def stock_disk(recipe: dict) -> Path:
    """A stock test image (stockimage.py), built once per recipe; skips the test without root."""
    if os.geteuid() != 0:
        pytest.skip("building the stock test image needs root")
    from . import stockimage
    return stockimage.build(recipe)


def world_readable_tmpdir(prefix: str) -> Path:
    # nginx workers (nobody) and QEMU (libvirt-qemu) must read what is in here.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="module")
def published_repo(built_image):
    """A repository directory holding the default image, as `vmloader images publish` writes it."""
    repo = world_readable_tmpdir("vmloader-repo-")
    publish.publish(ImageCache(config.load().cache_dir), repo, ["debian-12"])
    yield repo
    shutil.rmtree(repo, ignore_errors=True)


@pytest.fixture
def vm_env(built_image):
    # Not under tmp_path: pytest's base dir is 0700, and QEMU (as libvirt-qemu)
    # must traverse to the overlay in the job dir, as it would in /var/lib.
    state = Path(tempfile.mkdtemp(prefix="vmloader-test-", dir="/var/tmp"))
    os.chmod(state, 0o711)
    env = dict(os.environ)
    env["VMLOADER_STATE_DIR"] = str(state / "state")
    env.pop("VMLOADER_REPOSITORY", None)
    yield env
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def vmloader(vm_env, tmp_path):
    """Run the real `vmloader` CLI in a subprocess; returns a Run."""
    def call(*args, input: bytes = b"", env_extra=None, cwd=None, timeout=600) -> Run:
        env = dict(vm_env, **(env_extra or {}))
        proc = subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", *args],
                              input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, cwd=cwd or tmp_path, timeout=timeout)
        return Run(proc.returncode, proc.stdout, proc.stderr)
    return call


@pytest.fixture
def state_dir(vm_env) -> Path:
    return Path(vm_env["VMLOADER_STATE_DIR"])


def job_domain(job_dir: Path) -> str:
    """The libvirt name of a job's VM: its own, or (started warm) its lane's (owner.json says which)."""
    return json.loads((job_dir / "owner.json").read_text())["domain"]


def libvirt_domains() -> list:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                         stdout=subprocess.PIPE, text=True, check=True, timeout=120).stdout
    return [line for line in out.split() if line.startswith("vmloader-")]


def domains_left(names, seconds: float = 60.0) -> set:
    """Which of `names` libvirt still lists after waiting up to `seconds` for them to go: a VM that
    nothing was kept of is killed (its QEMU has exited when the job ends), and libvirt forgets it
    only once this host's init has reaped the process."""
    deadline = time.monotonic() + seconds
    while True:
        left = set(names) & set(libvirt_domains())
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@pytest.fixture
def no_leftovers(state_dir):
    """After the test: none of its jobs left a domain, and no overlay is outside the snapshot store.

    Only this test's jobs (those under its own state dir) count, so tests running
    beside other vmloader users on the machine do not see each other's VMs.
    """
    yield
    jobs = state_dir / "jobs"
    if not jobs.exists():
        return
    mine = {f"vmloader-{job.name}" for job in jobs.iterdir()}
    assert domains_left(mine) == set()
    assert list(jobs.glob("*/overlay.qcow2")) == []


REPO = Path(__file__).resolve().parents[2]


def ensure_user(name: str, groups: tuple = ()) -> "pwd.struct_passwd":
    """A local user for tests (HTCondor runs jobs as the submitting user, never as root)."""
    for group in groups:
        if subprocess.run(["getent", "group", group], capture_output=True).returncode != 0:
            subprocess.run(["groupadd", group], check=True)
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", name], check=True)
    for group in groups:
        subprocess.run(["usermod", "-a", "-G", group, name], check=True)
    return pwd.getpwnam(name)


@pytest.fixture(scope="session")
def readable_checkout():
    """A copy of the package other users can read (the clone may sit under /root).

    They run it with Debian's python3 and its python3-libvirt & co (make test
    installs them): the venv lives inside the clone too.
    """
    if os.geteuid() != 0:
        pytest.skip("running vmloader as other users needs root")
    root = Path(tempfile.mkdtemp(prefix="vmloader-user-", dir="/var/tmp"))
    for name in ("vmloader", "images"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    # Byte-compiled for them (they cannot write __pycache__ here, and would compile it at every start).
    subprocess.run(["/usr/bin/python3", "-m", "compileall", "-q", str(root / "vmloader")], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def as_user(user: "pwd.struct_passwd", checkout: Path, args: list, env: dict, **kwargs) -> subprocess.Popen:
    """Start the vmloader CLI as `user` with a clean environment plus `env`."""
    runtime = Path(f"/tmp/vmloader-test-xdg-{user.pw_uid}")
    runtime.mkdir(mode=0o700, exist_ok=True)
    os.chown(runtime, user.pw_uid, user.pw_gid)
    base = {"HOME": user.pw_dir, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "XDG_RUNTIME_DIR": str(runtime),
            "PYTHONPATH": str(checkout)}
    base.update(env)
    argv = ["runuser", "-u", user.pw_name, "--", "env", "-i", *(f"{k}={v}" for k, v in base.items()),
            "/usr/bin/python3", "-m", "vmloader.bootstrapper.cli", *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/tmp", **kwargs)


def file_sha256(path: Path) -> str:
    """A file's sha256, read in 1 MiB blocks (disk images are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture
def own_cache():
    """An image cache of the test's own (QEMU reads the images in it), removed afterwards."""
    path = world_readable_tmpdir("vmloader-own-cache-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def booted(vm_env, tmp_path):
    """Start `vmloader snapshot boot ID --json [EXTRA...]` (with `env` over the test's environment);
    yields its announcement; each is stopped with Ctrl-C when the test ends."""
    procs = []

    def boot(snap_id: str, *extra: str, env: Optional[dict] = None) -> dict:
        proc = subprocess.Popen([sys.executable, "-m", "vmloader.bootstrapper.cli", "snapshot", "boot", snap_id,
                                 "--json", *extra], env=dict(vm_env, **(env or {})), cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        line = next_line(proc)
        assert line, f"snapshot boot ended early: {proc.stderr.read()}"
        return json.loads(line)
    yield boot
    for proc in procs:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 0, proc.stderr.read()


CLI = [sys.executable, "-m", "vmloader.bootstrapper.cli"]


class Terminal:
    """A real pseudo-terminal around a vmloader command, driven like a user at a keyboard."""

    def __init__(self, argv, env, cwd, rows=33, cols=111):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, *argv[1:]], env)
        self.resize(rows, cols)
        self.seen = b""

    def resize(self, rows, cols):
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, keys: bytes):
        os.write(self.fd, keys)

    def expect(self, text: bytes, timeout=120) -> bytes:
        """Everything up to and including `text` (then forgotten)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"never saw {text!r}; the terminal shows {self.seen[-1500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:
                    raise AssertionError(f"the terminal closed before {text!r}: {self.seen[-1500:]!r}")
        head, _, self.seen = self.seen.partition(text)
        return head + text

    def wait(self, timeout=120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.read(self.fd, 4096)          # keep draining so the child never blocks on output
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the command did not end")


@pytest.fixture
def terminal(vm_env, tmp_path):
    """Start a vmloader command (with `env` over the test's environment) on a Terminal; a test that
    fails half-way still ends it (and its VM)."""
    started = []

    def open_terminal(*args, env: Optional[dict] = None):
        term = Terminal([*CLI, *args], dict(vm_env, **(env or {})), tmp_path)
        started.append(term)
        return term
    yield open_terminal
    for term in started:
        try:
            os.kill(term.pid, signal.SIGTERM)
            term.wait()
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture(scope="module")
def pool():
    """A real HTCondor pool (condor_pool.py), one per test module that asks: modules run theirs at once."""
    from .condor_pool import IMAGES, REPO, build_chroot, start_pool
    if os.geteuid() != 0:
        pytest.skip("the test pool needs root (debootstrap, namespaces)")
    # On a fresh machine the HTCondor chroot (about a minute) is built beside the images, not after
    # them (make test's prepare step has begun debian-11 and debian-13: these builds wait for its
    # and find them); fast when all are there.
    with concurrent.futures.ThreadPoolExecutor(1) as beside:
        chroot = beside.submit(build_chroot)
        for image in IMAGES:
            subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", "images", "build", image],
                           check=True, cwd=REPO, stdout=subprocess.DEVNULL, timeout=1800)
        chroot.result()
    pool = start_pool()
    yield pool
    pool.stop()

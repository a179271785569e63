"""A real HTCondor pool for the tests: Debian trixie's htcondor 23.9 in a chroot.

Bookworm has no HTCondor daemons, so the fixture debootstraps trixie with
htcondor, QEMU and libvirt (cached under /var/cache/vmloader-test, keyed by a
hash of the recipe below), installs this checkout's vmloader and condor/ files
into it, and starts a pool on loopback: collector, negotiator, schedd and two
startds ("vm1", "vm2"; one slot each, each with its own image cache), so a
test can show a job going to the worker that cached its image.

Everything runs in a private mount namespace (`unshare -m`): /proc, /dev,
/sys and tmpfs state dirs are mounted there only, and vanish with it. The
test talks to the pool through `nsenter` into that namespace and chroot.
Each pool writes into an overlay of its own over the cached chroot, so pools
of several test modules run at once and the cache stays as it was built.
"""
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("VMLOADER_TEST_CACHE", "/var/cache/vmloader-test"))
SUITE = "trixie"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("htcondor", "qemu-system-x86", "qemu-utils", "libvirt-daemon", "libvirt-daemon-driver-qemu",
            "libvirt-clients", "python3-libvirt", "python3-requests", "python3-psutil",
            "python3-pyinotify", "python3-pyasyncore", "dpkg-dev", "procps",
            "openssh-server", "openssh-client",       # condor_ssh_to_job: the starter's sshd, the user's ssh
            "e2fsprogs", "fdisk",                     # snapshot diff as the job's user: debugfs, e2fsck, sfdisk
            "mtools")                                 # stock images: the per-job cloud-init seed, made without root
USER = "vmjob"
CACHE_GROUP = "vmloader-cache"
IMAGES = ("debian-11", "debian-12", "debian-13")
SETUP_IN_CHROOT = f"""
set -e
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends {' '.join(PACKAGES)}
apt-get clean
groupadd -f {CACHE_GROUP}
id {USER} >/dev/null 2>&1 || useradd --uid 2345 --no-create-home --home-dir /home/{USER} --shell /bin/sh {USER}
usermod -a -G {CACHE_GROUP} {USER}
usermod -a -G {CACHE_GROUP} condor
"""
# Run inside the new mount namespace, before the master starts.
START_IN_CHROOT = f"""
set -e
mkdir -p /run/lock/condor /run/condor /var/lib/condor/execute /var/lib/condor/execute2 \
    /var/lib/condor/spool /var/spool/condor /home/{USER}
chown condor:condor /run/lock/condor /run/condor /var/lib/condor /var/lib/condor/execute \
    /var/lib/condor/execute2 /var/lib/condor/spool /var/spool/condor /var/log/condor
ln -sfn /run/lock /var/lock
chown {USER}:{USER} /home/{USER}
for c in /var/cache/vmloader-1 /var/cache/vmloader-2; do
    rm -rf $c; mkdir -m 0755 $c      # one writer (root): jobs only read; fresh for each pool
done
# The system libvirtd of root, for the warm states the cache service of vm2 keeps (jobs run as
# users, with session daemons of their own); in this chroot it cannot give QEMU a mount namespace.
grep -qx "namespaces = \\[\\]" /etc/libvirt/qemu.conf || echo "namespaces = []" >> /etc/libvirt/qemu.conf
# /dev is the host /dev, so /dev/kvm has the kvm gid of the host, which the kvm group of this chroot
# (libvirt-qemu is in it) may not have: libvirtd then found KVM usable when it probed QEMU and unusable
# when it checked that probe, and probed again at every lookup (80 s before each VM of root started).
# On a real worker the kvm group is the group of the device. (No quote marks here: sh -c quotes this.)
if [ -e /dev/kvm ]; then g=$(stat -c %g /dev/kvm); [ "$(getent group kvm | cut -d: -f3)" = "$g" ] || groupmod -o -g "$g" kvm; fi
virtlogd -d
libvirtd -d
exec /usr/sbin/condor_master -f
"""


# HTCondor 23.9 finds cgroup v1 controllers at /sys/fs/cgroup/{memory,cpu,cpuacct,freezer,devices}
# (its names, as systemd mounts them: cpu and cpuacct in one hierarchy). This host mounts cpu and
# cpuacct apart, so the starter would say "Cgroup cpu,cpuacct// is not writeable, cannot use
# cgroups" and track jobs by process tree only. In the pool's own mount namespace the controllers
# are bound in again under a fresh tmpfs, cpuacct also as `cpu,cpuacct`: HTCondor reads a job's CPU
# from cpuacct.stat there (its cpu.shares write fails, logged; each slot has one core anyway).
# Nothing of this reaches the host's /sys/fs/cgroup. A host with cgroup v2 is left as it is.
CGROUP_CONTROLLERS = ("memory", "cpuacct", "freezer", "devices", "cpu", "pids", "blkio", "cpuset")
CGROUPS_V1 = (
    "if [ -d /sys/fs/cgroup/memory ] && [ -d /sys/fs/cgroup/cpuacct ] && [ ! -e /sys/fs/cgroup/cpu,cpuacct ]; "
    "then mount -t tmpfs -o mode=0755 cgroup $R/sys/fs/cgroup; "
    f"for c in {' '.join(CGROUP_CONTROLLERS)}; do if [ -d /sys/fs/cgroup/$c ]; then "
    "mkdir $R/sys/fs/cgroup/$c; mount --bind /sys/fs/cgroup/$c $R/sys/fs/cgroup/$c; fi; done; "
    "mkdir $R/sys/fs/cgroup/cpu,cpuacct; mount --bind /sys/fs/cgroup/cpuacct $R/sys/fs/cgroup/cpu,cpuacct; fi;")


def base_cgroup(port: int) -> str:
    """The pool's own cgroup under each controller: pools of parallel test runs never share one."""
    return f"htcondor-vmloader-test-{port}"


def recipe_key() -> str:
    return hashlib.sha256(json.dumps([SUITE, MIRROR, PACKAGES, SETUP_IN_CHROOT]).encode()).hexdigest()[:16]


def _log(message: str) -> None:
    print(f"condor pool: {message}", file=sys.stderr, flush=True)


def build_chroot() -> Path:
    """The trixie + htcondor chroot, built once per recipe (about two minutes)."""
    final = CACHE / f"condor-{recipe_key()}"
    if (final / ".complete").exists():
        return final / "root"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "condor-build.lock", "a") as lock:    # one builder: another's rename would remove ours
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".complete").exists():
            return final / "root"
        return _build_chroot(final)


def _build_chroot(final: Path) -> Path:
    work = CACHE / f"condor-{recipe_key()}.building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    root = work / "root"
    _log(f"debootstrap {SUITE} into {root} (about a minute)")
    subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(root), MIRROR], check=True,
                   stdout=subprocess.DEVNULL)
    _log("installing htcondor, QEMU and libvirt in the chroot (about a minute)")
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    f"mount -t proc proc {root}/proc && mount --rbind /dev {root}/dev && "
                    f"mount --rbind /sys {root}/sys && chroot {root} sh -c '{SETUP_IN_CHROOT}'"],
                   check=True, stdout=subprocess.DEVNULL)
    (work / ".complete").write_text(recipe_key() + "\n")
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    return final / "root"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pool_config(port: int, cgroups: bool = True, keep_warm: bool = True) -> str:
    return f"""
# Written by the vmloader test fixture: a two-startd personal pool on loopback.
CONDOR_HOST = 127.0.0.1
COLLECTOR_HOST = 127.0.0.1:{port}
NETWORK_INTERFACE = 127.0.0.1
BIND_ALL_INTERFACES = False
DAEMON_LIST = MASTER, COLLECTOR, NEGOTIATOR, SCHEDD, STARTD, STARTD2, VMLOADER_CACHED1, VMLOADER_CACHED2
# The image cache service of each startd's cache, run as root by the master (condor/config.d).
VMLOADER_CACHED1 = /usr/local/bin/vmloader
VMLOADER_CACHED1_ARGS = cache serve --log $(LOG)/VmloaderCacheLog.1
VMLOADER_CACHED1_ENVIRONMENT = "VMLOADER_CACHE_DIR=/var/cache/vmloader-1"
VMLOADER_CACHED2 = /usr/local/bin/vmloader
VMLOADER_CACHED2_ARGS = cache serve --log $(LOG)/VmloaderCacheLog.2
# vm2's service keeps debian-12 warm (keep_warm), as a site's would; vm1's keeps nothing.
VMLOADER_CACHED2_ENVIRONMENT = "VMLOADER_CACHE_DIR=/var/cache/vmloader-2{" VMLOADER_KEEP_WARM=debian-12" if keep_warm else ""}"
use SECURITY : HOST_BASED
ALLOW_ADMINISTRATOR = *
ALLOW_WRITE = *
ALLOW_READ = *
ALLOW_NEGOTIATOR = *
ALLOW_DAEMON = *
QUEUE_SUPER_USERS = root, condor
# Inside a chroot (see the developers' brief).
MOUNT_UNDER_SCRATCH =
USE_PID_NAMESPACES = False
# Fast turnaround for tests.
NEGOTIATOR_INTERVAL = 2
NEGOTIATOR_CYCLE_DELAY = 1
NEGOTIATOR_MIN_INTERVAL = 1
SCHEDD_INTERVAL = 2
SCHEDD_MIN_INTERVAL = 1
UPDATE_INTERVAL = 2
STARTER_UPDATE_INTERVAL = 2
SHADOW_QUEUE_UPDATE_INTERVAL = 2
# The probe every 20 s (a site's: 60 s): each run is a Python start of about 0.3 CPU-s, and the
# tests that wait for an advertisement wait up to 120 s.
STARTD_CRON_VMLOADER_PERIOD = 20s
DAGMAN_USER_LOG_SCAN_INTERVAL = 1
START = True
SUSPEND = False
PREEMPT = False
KILL = False
WANT_SUSPEND = False
WANT_VACATE = False
STARTD_JOB_ATTRS = $(STARTD_JOB_ATTRS) VMImage
# Two startds, one slot each, each with its own image cache.
NUM_CPUS = 1
MEMORY = 3072
STARTD_NAME = vm1
STARTD_CRON_VMLOADER_ENV = "VMLOADER_CACHE_DIR=/var/cache/vmloader-1"
STARTD2 = $(STARTD)
STARTD2_ARGS = -f -local-name STARTD2
STARTD2.STARTD_NAME = vm2
STARTD2.STARTD_LOG = $(LOG)/StartLog.2
STARTD2.STARTD_ADDRESS_FILE = $(LOG)/.startd2_address
STARTD2.EXECUTE = $(LOCAL_DIR)/lib/condor/execute2
STARTD2.STARTD_CRON_VMLOADER_ENV = "VMLOADER_CACHE_DIR=/var/cache/vmloader-2"
RunBenchmarks = False
# cgroup-based accounting and limits (see CGROUPS_V1): each job in its own cgroup under this
# pool's base; its memory limit is its slot's Memory, enforced (hard).
BASE_CGROUP = {base_cgroup(port) if cgroups else ""}
CGROUP_MEMORY_LIMIT_POLICY = hard
EXECUTE = $(LOCAL_DIR)/lib/condor/execute
"""


class Pool:
    def __init__(self, root: Path, port: int, cgroups: bool = True, keep_warm: bool = True):
        self.chroot = root
        self.port = port
        self.cgroups = cgroups          # False: HTCondor tracks jobs by process tree (bench/)
        self.keep_warm = keep_warm      # False: no cache service keeps a warm state (bench/)
        self.proc: Optional[subprocess.Popen] = None
        self.mnt_ns = ""

    # -- paths and commands inside the pool ----------------------------------
    @property
    def root(self) -> Path:
        """The chroot as the pool's processes see it (with their tmpfs mounts)."""
        return Path(f"/proc/{self.proc.pid}/root")

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def run(self, argv: list, *, user: Optional[str] = USER, cwd: str = "/", check: bool = False,
            timeout: float = 120, input: Optional[str] = None) -> subprocess.CompletedProcess:
        env = ["env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG=C.UTF-8",
               f"HOME={'/root' if user in (None, 'root') else '/home/' + user}"]
        inner = env + list(argv)
        if user not in (None, "root"):
            inner = ["runuser", "-u", user, "--"] + inner
        # (nsenter's --wd resolves the directory before --root applies: cd inside instead)
        done = subprocess.run(["nsenter", "--target", str(self.proc.pid), "--mount", "--root",
                               "sh", "-c", 'cd "$0" && exec "$@"', cwd] + inner, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=timeout, input=input)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}{done.stdout}")
        return done

    def vmloader(self, *args, user: str = USER, cache: str = "/var/cache/vmloader-1", **kw):
        return self.run(["env", f"VMLOADER_CACHE_DIR={cache}", "vmloader", *args], user=user, **kw)

    def warm(self, image: str, cache: str) -> None:
        """Root's warm state of `image` in a worker's cache (`images warm`, as a site's STARTD_CRON or
        admin would; the system libvirtd saves it): that worker's jobs of the default shape restore it."""
        self.vmloader("images", "warm", image, cache=cache, user="root", check=True, timeout=1800)

    # -- lifecycle -------------------------------------------------------------
    def install(self) -> None:
        """This checkout's vmloader and condor/ files, and the images as a repository."""
        opt = self.chroot / "opt/vmloader"
        shutil.rmtree(opt, ignore_errors=True)
        shutil.copytree(REPO / "vmloader", opt / "vmloader", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "images", opt / "images")
        # Byte-compiled as a package install is: the startd's probe (every few seconds) and each job's
        # wrapper run as users who cannot write __pycache__ here, and would compile it every time.
        subprocess.run(["chroot", str(self.chroot), "python3", "-m", "compileall", "-q", "/opt/vmloader/vmloader"],
                       check=True, stdout=subprocess.DEVNULL)
        bin_ = self.chroot / "usr/local/bin/vmloader"
        bin_.write_text('#!/bin/sh\nPYTHONPATH=/opt/vmloader exec python3 -m vmloader.bootstrapper.cli "$@"\n')
        bin_.chmod(0o755)
        libexec = self.chroot / "usr/local/libexec"
        libexec.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / "condor/vmloader-job-wrapper", libexec / "vmloader-job-wrapper")
        share = self.chroot / "usr/local/share/vmloader"
        share.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / "condor/ssh_to_job_sshd_config_template", share / "ssh_to_job_sshd_config_template")
        confd = self.chroot / "etc/condor/config.d"
        for old in confd.glob("*vmloader*"):
            old.unlink()
        for conf in (REPO / "condor/config.d").glob("*.conf"):
            shutil.copy2(conf, confd / conf.name)
        (confd / "90-vmloader-test-pool.conf").write_text(pool_config(self.port, self.cgroups, self.keep_warm))
        etc = self.chroot / "etc/vmloader"
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "config.toml").write_text(
            'repositories = ["/srv/vmloader-repo"]\ncache_dir = "/var/cache/vmloader-1"\nmemory_mib = 768\n'
            'host_cert = "/etc/vmloader/hostcert.pem"\nhost_key = "/etc/vmloader/hostkey.pem"\n'
            'host_cert_images = ["debian-12"]\n'    # the credentials go into debian-12 guests only
            'warm_lanes = 1\n')                    # one slot per startd: one job of a shape at a time
        # Stand-ins for a worker's host credentials: the key readable by job users through their group.
        (etc / "hostcert.pem").write_text("-----BEGIN CERTIFICATE-----\ntest\n-----END CERTIFICATE-----\n")
        (etc / "hostkey.pem").write_text("-----BEGIN PRIVATE KEY-----\ntest\n-----END PRIVATE KEY-----\n")
        subprocess.run(["chmod", "-R", "a+rX", str(opt), str(etc), str(share)], check=True)
        self.run_chroot(["sh", "-c", f"chgrp {CACHE_GROUP} /etc/vmloader/hostkey.pem && "
                                     "chmod 0640 /etc/vmloader/hostkey.pem"])

    def run_chroot(self, argv: list) -> None:
        """Before the pool runs: a command in the plain chroot (names resolve to its users)."""
        subprocess.run(["chroot", str(self.chroot)] + argv, check=True)

    def publish_images(self) -> None:
        repo = self.chroot / "srv/vmloader-repo"
        subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", "images", "publish", str(repo),
                        *IMAGES], check=True, stdout=subprocess.DEVNULL, cwd=REPO)
        subprocess.run(["chmod", "-R", "a+rX", str(repo)], check=True)

    def start(self) -> None:
        script = (f"set -e; R={self.chroot}; mount -t proc proc $R/proc; mount --rbind /dev $R/dev; "
                  f"mount --rbind /sys $R/sys; {CGROUPS_V1 if self.cgroups else ''} "
                  # ssh_to_job's sshd runs as the job's user and gives up on a pty it cannot chown to
                  # group tty: new ptys in group tty, as systemd mounts devpts on a real worker.
                  "mount -t devpts -o newinstance,gid=5,mode=620,ptmxmode=0666 devpts $R/dev/pts; "
                  "mount --bind $R/dev/pts/ptmx $R/dev/ptmx; "
                  "for d in run tmp var/lib/condor var/log/condor var/spool/condor home; do "
                  "mkdir -p $R/$d; mount -t tmpfs -o mode=0755 tmpfs $R/$d; done; chmod 1777 $R/tmp; "
                  f"exec chroot $R sh -c '{START_IN_CHROOT}'")
        self.log = open(CACHE / f"pool-{os.getpid()}.log", "w")
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
        time.sleep(0.5)
        self.mnt_ns = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
        self.wait_for(lambda: self.slots() >= 2, 120, "both startds to report a slot with the VMLoader probe")

    def slots(self) -> int:
        if self.proc.poll() is not None:
            raise AssertionError(f"condor_master exited ({self.proc.returncode}); see {self.log.name}")
        done = self.run(["condor_status", "-constraint", "VMLoaderHypervisors isnt undefined", "-af", "Name"],
                        user=None, timeout=30)
        return len(done.stdout.split()) if done.returncode == 0 else 0

    def wait_for(self, condition, timeout: float, what: str, interval: float = 1.0):
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                     f"master log: {self.path('/var/log/condor/MasterLog')}")
            time.sleep(interval)

    def namespace_pids(self) -> list:
        """Every process in the pool's mount namespace: all of them are ours to end."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self.proc.pid:
                try:
                    if os.readlink(entry / "ns/mnt") == self.mnt_ns:
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    def command_lines(self) -> dict:
        """{pid: command line} of the pool's processes; one that ends while we look is left out."""
        found = {}
        for pid in self.namespace_pids():
            try:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
        return found

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)       # the master shuts its daemons down
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.namespace_pids():           # e.g. a libvirt session daemon a job started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.remove_cgroups()
        self.log.close()
        if self.proc.returncode == 0:
            Path(self.log.name).unlink(missing_ok=True)
        if self.chroot.parent.parent == POOLS:
            _remove_view(self.chroot.parent)


    def remove_cgroups(self) -> None:
        """The pool's base cgroup in each host controller, once its jobs are gone (empty dirs only)."""
        for controller in CGROUP_CONTROLLERS:
            base = Path("/sys/fs/cgroup", controller, base_cgroup(self.port))
            if not base.is_dir():
                continue
            for dirpath, _, _ in sorted(os.walk(base), key=lambda entry: -len(entry[0])):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass


POOLS = CACHE / "pools"


def _mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/self/mounts").read_text().splitlines())


def _remove_view(base: Path) -> None:
    root = base / "root"
    if _mounted(root):
        subprocess.run(["umount", "--lazy", str(root)], check=True)
    shutil.rmtree(base, ignore_errors=True)


def pool_view(lower: Path) -> Path:
    """A writable view of the cached chroot for one pool: an overlay whose writes (this checkout's
    vmloader, the pool's config with its port, the repository, the caches) go to a dir of this
    pool's. Views left by test processes that are gone are removed first."""
    POOLS.mkdir(parents=True, exist_ok=True)
    for old in POOLS.iterdir():
        owner = old.name.split("-")[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            _remove_view(old)
    base = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=POOLS))
    for part in ("upper", "work", "root"):
        (base / part).mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={base / 'upper'},workdir={base / 'work'}", str(base / "root")],
                   check=True)
    return base / "root"


def start_pool(cgroups: bool = True, keep_warm: bool = True) -> Pool:
    root = pool_view(build_chroot())
    pool = Pool(root, free_port(), cgroups, keep_warm)
    pool.install()
    pool.publish_images()
    pool.start()
    return pool

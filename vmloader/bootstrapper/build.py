"""Build guest images from Debian packages: debootstrap, agent, ext4, qcow2.

No mounts are needed: debootstrap fills a directory, `mke2fs -d` turns it
into a filesystem image, `qemu-img convert` into qcow2. The slow debootstrap
step is cached as a directory keyed by a hash of the recipe, so rebuilding
after an agent change takes seconds.
"""
import compileall
import fcntl
import hashlib
import json
import os
import py_compile
import shutil
import stat
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional

from . import initramfs, proc
from .cache import ImageCache, sha256_file
from .cacheindex import open_lock
from .catalog import Artifact, ImageEntry, Recipe
from .errors import ImageBuildError

BUILDER_VERSION = "1"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]          # the vmloader package
AGENT_FILES = ("__init__.py", "protocol.py", "agent")
GUEST_USER = ("vmloader", 1000)
# Part of the image key: what the build does to the tree besides the agent's files (a change
# rebuilds images; the default command line is in the key by itself). 2: the agent's bytecode
# compiled in.
GUEST_PREP = "2"

Progress = Callable[[str], None]


def stderr_progress(message: str) -> None:
    print(f"vmloader: {message}", file=sys.stderr, flush=True)


def _agent_sources() -> list:
    files = []
    for name in AGENT_FILES:
        path = PACKAGE_ROOT / name
        files.extend(sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
                     if path.is_dir() else [path])
    return files


def recipe_key(recipe: Recipe) -> str:
    """Identifies the debootstrap tree: changes only when the package set does."""
    text = json.dumps({"recipe": recipe.to_dict(), "builder": BUILDER_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def image_key(entry: ImageEntry) -> str:
    """Identifies the finished image: recipe + agent + init + sizes."""
    recipe = _recipe(entry)
    digest = hashlib.sha256(recipe_key(recipe).encode())
    cmdline = image_cmdline(entry, recipe)
    digest.update(f"{entry.disk_gib}:{cmdline}:initramfs-{initramfs.VERSION}:{GUEST_PREP}".encode())
    for path in _agent_sources():
        digest.update(str(path.relative_to(PACKAGE_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _recipe(entry: ImageEntry) -> Recipe:
    """What `entry` is built from; an image without a recipe can only be pulled."""
    if entry.recipe is None:
        raise ImageBuildError(f"image {entry.name} has no recipe to build from",
                              hint="pull it from a repository instead")
    return entry.recipe


def _packages(recipe: Recipe) -> list:
    extra = ["systemd-sysv"] if recipe.init == "systemd" else []
    return list(recipe.packages) + extra


def _owned_by_us(path: Path, kind: Callable[[int], bool]) -> bool:
    """`path` exists as a `kind` (S_ISDIR, S_ISREG) that we own and nobody else can write: lstat, no links."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not kind(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ImageBuildError(f"refusing to reuse {path}: it is a link, not ours (uid {st.st_uid}), "
                              f"or writable by others (mode {stat.S_IMODE(st.st_mode):04o})",
                              hint=f"remove it as root (rm -rf {path}) and build again")
    return True


def tree_path(cache_root: Path, recipe: Recipe) -> Path:
    """Where `recipe`'s debootstrap tree is kept in a cache (reused by every build of it)."""
    return cache_root / "rootfs" / recipe_key(recipe)


def _debootstrap(recipe: Recipe, cache: ImageCache, progress: Progress) -> Path:
    tree = tree_path(cache.root, recipe)
    rootfs = tree.parent
    if (_owned_by_us(rootfs, stat.S_ISDIR) and _owned_by_us(tree, stat.S_ISDIR)
            and _owned_by_us(tree / ".vmloader-complete", stat.S_ISREG)):
        progress(f"reusing cached debootstrap tree for {recipe.suite}")
        return tree
    if os.geteuid() != 0:
        raise ImageBuildError("building images needs root (debootstrap creates device nodes and chowns files)",
                              hint="run `sudo vmloader images build NAME`, or pull a built image")
    shutil.rmtree(tree, ignore_errors=True)         # ours (checked above): an unfinished tree
    rootfs.mkdir(mode=0o755, parents=True, exist_ok=True)
    progress(f"debootstrap {recipe.suite} ({len(_packages(recipe))} extra packages; about a minute)")
    started = time.monotonic()
    proc.run(["debootstrap", "--variant=minbase", "--include=" + ",".join(_packages(recipe)),
              recipe.suite, str(tree)], phase="image build",
             hint="check that the Debian mirror is reachable and debootstrap is installed")
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
        shutil.rmtree(tree / junk, ignore_errors=True)
    with os.fdopen(os.open(tree / ".vmloader-complete", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                           0o644), "w") as marker:
        marker.write(recipe.suite + "\n")
    progress(f"debootstrap done in {time.monotonic() - started:.0f} s")
    return tree


def _add_guest_user(root: Path) -> None:
    name, uid = GUEST_USER
    passwd = (root / "etc/passwd").read_text()
    if f"\n{name}:" in "\n" + passwd:
        return
    with open(root / "etc/passwd", "a") as f:
        f.write(f"{name}:x:{uid}:{uid}:vmloader job user:/home/{name}:/bin/sh\n")
    with open(root / "etc/group", "a") as f:
        f.write(f"{name}:x:{uid}:\n")
    with open(root / "etc/shadow", "a") as f:
        f.write(f"{name}:!:19000:0:99999:7:::\n")
    for path in (root / "home" / name, root / "work"):
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, uid, uid)


def _install_agent(root: Path, recipe: Recipe) -> None:
    lib = root / "usr/lib/vmloader"
    shutil.rmtree(lib, ignore_errors=True)
    for path in _agent_sources():
        dest = lib / "vmloader" / path.relative_to(PACKAGE_ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    agent_dir = PACKAGE_ROOT / "agent"
    shutil.copyfile(agent_dir / "guest-setup", lib / "guest-setup")
    os.chmod(lib / "guest-setup", 0o755)
    shutil.copyfile(agent_dir / "vmloader-init", root / "sbin/vmloader-init")
    os.chmod(root / "sbin/vmloader-init", 0o755)
    _compile_agent(root, lib)
    if recipe.init == "systemd":
        unit = root / "etc/systemd/system/vmloader-agent.service"
        shutil.copyfile(agent_dir / "vmloader-agent.service", unit)
        wants = root / "etc/systemd/system/sysinit.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / "vmloader-agent.service"
        if not link.is_symlink():
            link.symlink_to("/etc/systemd/system/vmloader-agent.service")


def _compile_agent(root: Path, lib: Path) -> bool:
    """The agent's bytecode, compiled here when the guest's python3 is this one's version (same
    bytecode), so a cold boot does not compile it under emulation each time (the root is the
    job's throwaway overlay: nothing the guest compiles survives). Unchecked-hash pycs: valid
    whatever the files' times become in the image. False: the guest compiles it as before."""
    try:
        target = os.readlink(root / "usr/bin/python3")
    except OSError:
        return False
    if Path(target).name != f"python{sys.version_info.major}.{sys.version_info.minor}":
        return False
    return bool(compileall.compile_dir(str(lib / "vmloader"), ddir="/usr/lib/vmloader/vmloader", quiet=1,
                                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH))


def _boot_files(root: Path) -> tuple:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise ImageBuildError(f"no kernel or initrd in {root}/boot",
                              hint="the recipe must include a linux-image package and initramfs-tools")
    return kernels[-1], initrds[-1]


def default_cmdline(recipe: Recipe) -> str:
    init = "" if recipe.init == "systemd" else " init=/sbin/vmloader-init"
    # no_timer_check: the kernel's IO-APIC timer check fails on a busy emulated host and panics
    # ("IO-APIC + timer doesn't work!"); a virtual machine's timer is known to work.
    # cryptomgr.notests: the crypto self-tests take about 0.5 s of an emulated (TCG) boot; they
    # test the kernel's code, which is the distribution's and the same in every job. (Not
    # pci=noacpi against slow PCI interrupt links: it leaves virtio without MSI-X, on the 8259
    # PIC, with a kernel WARNING per device. domain.machine_type avoids them instead.)
    return "root=/dev/vda rw console=ttyS0 quiet no_timer_check cryptomgr.notests" + init


def image_cmdline(entry: ImageEntry, recipe: Recipe) -> str:
    """The kernel command line a built image records (and its key hashes)."""
    return entry.cmdline or default_cmdline(recipe)


def build_image(entry: ImageEntry, cache: ImageCache, *, force: bool = False,
                progress: Progress = stderr_progress) -> ImageEntry:
    """Build `entry` (which must have a recipe) into the cache; returns the built entry."""
    recipe = _recipe(entry)
    key = image_key(entry)
    version = f"{entry.version}.{key[:12]}"
    existing = _up_to_date(entry, version, cache)
    if existing and not force:
        progress(f"image {entry.name} is up to date ({version})")
        return existing
    with _one_debootstrap_of(recipe, cache, progress):     # (other recipes' trees are made meanwhile)
        tree = _debootstrap(recipe, cache, progress)
    with _one_build_at_a_time(cache, progress):
        existing = _up_to_date(entry, version, cache)
        if existing and not force:         # another build made it while this one waited
            progress(f"image {entry.name} is up to date ({version}): built while waiting")
            return existing
        return _build_locked(entry, recipe, version, tree, cache, progress)


def _up_to_date(entry: ImageEntry, version: str, cache: ImageCache) -> Optional[ImageEntry]:
    existing = cache.built_manifest().find(f"{entry.name}@{version}", need_artifacts=True)
    return existing if existing and cache.has_all(existing) else None


@contextmanager
def _turn(lock: Path, waiting: str, progress: Progress) -> Iterator[None]:
    """Holds `lock` (the cache's own file, never opened through a link), saying `waiting` first
    when another build holds it."""
    with open_lock(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _one_debootstrap_of(recipe: Recipe, cache: ImageCache, progress: Progress) -> ContextManager[None]:
    """Builds of one recipe take turns at its debootstrap tree (a second would remove the tree the
    first is writing); builds of other recipes debootstrap meanwhile (on a fresh worker, the
    minutes of downloads and dpkg of two suites overlap)."""
    tree = tree_path(cache.root, recipe)
    cache.ensure_dirs()
    tree.parent.mkdir(mode=0o755, exist_ok=True)
    _owned_by_us(tree.parent, stat.S_ISDIR)         # (refused: a link, or writable by others)
    return _turn(tree.with_name(tree.name + ".lock"),
                 f"waiting for another build's debootstrap of {recipe.suite} in this cache", progress)


def _one_build_at_a_time(cache: ImageCache, progress: Progress) -> ContextManager[None]:
    """Builds on one cache assemble their images in turn: they share the built manifest (and the
    scratch space, and the disk's bandwidth)."""
    cache.ensure_dirs()
    return _turn(cache.root / "build.lock", "waiting for another image build in this cache to finish", progress)


def _build_locked(entry: ImageEntry, recipe: Recipe, version: str, tree: Path, cache: ImageCache,
                  progress: Progress) -> ImageEntry:
    work = cache.scratch_dir(f"build-{entry.name}")
    try:
        return _assemble(entry, recipe, version, tree, work, cache, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _assemble(entry: ImageEntry, recipe: Recipe, version: str, tree: Path, work: Path,
              cache: ImageCache, progress: Progress) -> ImageEntry:
    root = work / "root"
    progress("copying the root tree and installing the agent")
    proc.run(["cp", "-a", "--reflink=auto", str(tree), str(root)], phase="image build")
    (root / ".vmloader-complete").unlink(missing_ok=True)
    _add_guest_user(root)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()          # every VM makes its own (`snapshot boot --ssh`), none ships in the image
    _install_agent(root, recipe)
    kernel, initrd = _boot_files(root)
    small = work / f"{initrd.name}-vmloader"
    if initramfs.build(root, kernel.name.removeprefix("vmlinuz-"), small):
        progress(f"own initramfs ({small.stat().st_size // 1024} KiB) instead of {initrd.name}")
        initrd = small
    progress(f"writing a {entry.disk_gib} GiB ext4 filesystem")
    raw = work / "disk.raw"
    proc.run(["mke2fs", "-q", "-t", "ext4", "-L", "vmroot", "-d", str(root), str(raw),
              f"{entry.disk_gib}G"], phase="image build")
    progress("converting to qcow2")
    disk = work / "disk.qcow2"
    proc.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)], phase="image build")
    artifacts = {}
    for kind, path in (("disk", disk), ("kernel", kernel), ("initrd", initrd)):
        art = Artifact(url=f"{entry.name}/{version}/{path.name}", sha256=sha256_file(path),
                       size=path.stat().st_size)
        cache.insert_file(path, art, move=True)
        artifacts[kind] = art
    built = replace(entry, version=version, artifacts=artifacts,
                    cmdline=image_cmdline(entry, recipe))
    cache.record_built(built)
    progress(f"built {built.ref} (disk {artifacts['disk'].size / 2**20:.0f} MiB)")
    return built

"""The verified local image cache on a worker.

Artifacts are stored by content: `artifacts/<sha256>`. A file only gets
there through `insert_file`, which hashes it first and renames it into place,
so a cache entry is always complete and verified. Images built on this
worker are listed in `built/manifest.json`; repositories (directories and
HTTP mirrors, see repository.py) are asked for the rest.

One writer: this class writes a cache only as the owner of its root directory
(root, or a dedicated system user). Every directory is the owner's, 0755;
artifacts are 0444. Other users read it through cacheservice.py (which asks the
owner's `vmloader cache serve` for what is not cached yet), and keep their own
images in a private cache of their own.
"""
import hashlib
import os
import shutil
import sqlite3
import stat
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, NoReturn, Optional, Sequence

from .cacheindex import CacheIndex, ensure_pin_files, exclusive_if_unpinned, pinned, remove_artifact
from .catalog import (EMBEDDED_MANIFEST, Artifact, ImageEntry, Manifest,
                      load_manifest, write_manifest)
from .errors import ImageError
from .integrity import Stamps, check_intact
from .ownedfiles import open_owned, owner_of

if TYPE_CHECKING:
    from .download import ProgressSink
    from .repository import Repository

CHUNK = 1 << 20


CACHE_DIRS = ("artifacts", "tmp", "pins", "verified", "index", "built", "custom", "manifests", "rootfs")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return sha256_handle(handle)


def sha256_handle(handle) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(CHUNK), b""):
        digest.update(block)
    return digest.hexdigest()


def legacy_fix_command(root: Path) -> str:
    return f"chmod -R go-w {root} && find {root} -type d -exec chmod g-s {{}} +"


@dataclass(frozen=True)
class ResolvedImage:
    entry: ImageEntry
    paths: Mapping[str, Path]

    @property
    def disk(self) -> Path:
        return self.paths["disk"]

    @property
    def kernel(self) -> Optional[Path]:
        return self.paths.get("kernel")

    @property
    def initrd(self) -> Optional[Path]:
        return self.paths.get("initrd")

    @property
    def firmware_boot(self) -> Optional[str]:
        """"bios" or "uefi" when the VM boots the disk's own boot loader; None for a kernel booted directly."""
        return self.entry.firmware if self.kernel is None else None


class ImageCache:
    def __init__(self, root: Path, repositories: Sequence["Repository"] = (),
                 embedded: Path = EMBEDDED_MANIFEST, max_bytes: int = 0):
        self.root = Path(root)
        self.repositories = list(repositories)
        self.embedded = embedded
        self.max_bytes = max_bytes            # 0: unbounded
        self.index = CacheIndex(self.root / "index", self.artifacts_dir)
        self.stamps = Stamps(self.root / "verified")
        # (label, total) -> where a download reports; None: a download.Progress on stderr
        self.progress: "Optional[Callable[[str, int], ProgressSink]]" = None

    @classmethod
    def configured(cls, cfg):
        """The cache as configured: its dir, its repositories (mirrors, in order), its bound.

        The owner of the cache dir (or whoever creates it) gets the writer; anyone else a
        reader (cacheservice.SharedCacheReader) with a private cache of their own.
        """
        if not owns(cfg.cache_dir):
            from .cacheservice import SharedCacheReader
            return SharedCacheReader.configured(cfg)
        return cls.writer(cfg)

    @classmethod
    def writer(cls, cfg) -> "ImageCache":
        from .repository import repository_for
        cache = cls(cfg.cache_dir, [repository_for(r, cfg.cache_dir) for r in cfg.repositories],
                    max_bytes=cfg.cache_max_bytes)
        cache.tighten_legacy()
        return cache

    def tighten_legacy(self) -> bool:
        """A cache set up the old way (group-writable, setgid): made single-writer again.

        Whatever another user could have planted (links, files or dirs not ours) is removed;
        the old index is thrown away unread. True when something was changed."""
        try:
            st = os.lstat(self.root)
        except FileNotFoundError:
            return False
        if not st.st_mode & (0o022 | stat.S_ISGID):
            return False
        os.chmod(self.root, 0o755)
        for name in CACHE_DIRS:
            _tighten_dir(self.root / name, deep=name != "rootfs")
        shutil.rmtree(self.root / "index", ignore_errors=True)
        return True

    @property
    def pins_dir(self) -> Path:
        return self.root / "pins"

    def pin(self, image: "ResolvedImage"):
        """Context manager: while held, no process evicts this image's files."""
        return pinned(self.pins_dir, [a.sha256 for a in image.entry.artifacts.values()])

    def _record_use(self, entry: ImageEntry) -> None:
        self.ensure_dirs()
        ensure_pin_files(self.pins_dir, [a.sha256 for a in entry.artifacts.values()])
        try:
            for art in entry.artifacts.values():
                self.index.touch(art.sha256, art.size, entry.ref)
        except sqlite3.Error:
            pass        # bookkeeping only: a busy or damaged index must not stop a job

    def evict(self, max_bytes: Optional[int] = None, keep: Sequence[str] = ()) -> list:
        """Delete least recently used artifacts until the cache fits; never a pinned one. The warm
        states of this cache's owner count too, and go with their image (never one a job holds)."""
        from .warm import WarmStore                        # (warm.py uses this module)
        limit = self.max_bytes if max_bytes is None else max_bytes
        entries = [e for e in self.index.entries() if (self.artifacts_dir / e.sha256).exists()]
        states = WarmStore(self.root / "warm", 0, shared=os.geteuid() == 0)
        total = sum(e.size for e in entries) + (states.total_bytes() if limit else 0)
        removed = []
        for entry in entries:
            if total <= limit:
                break
            if entry.sha256 in keep:
                continue
            with exclusive_if_unpinned(self.pins_dir, entry.sha256) as free:
                if free:
                    remove_artifact(self.artifacts_dir / entry.sha256)
                    self.index.forget(entry.sha256)
                    total -= entry.size + states.remove_image_states(entry.sha256)
                    removed.append(entry)
        return removed

    def _evict_quietly(self, keep: Sequence[str]) -> None:
        try:
            self.evict(keep=keep)
        except (OSError, sqlite3.Error):
            pass        # another user's cache we may read but not manage: its owner prunes it

    def remove_image(self, name: str) -> list:
        """Remove every cached artifact of image `name` (all versions); refuses pinned ones."""
        mine = [e for e in self.index.entries() if e.image.partition("@")[0] == name]
        if not mine:
            raise ImageError(f"image {name} has nothing in the cache", hint="see vmloader images list")
        for entry in mine:
            with exclusive_if_unpinned(self.pins_dir, entry.sha256) as free:
                if not free:
                    raise ImageError(f"image {name} is in use by a running job ({entry.sha256[:12]} is pinned)",
                                     hint="wait for the job to end, then remove it")
                remove_artifact(self.artifacts_dir / entry.sha256)
                self.index.forget(entry.sha256)
        return mine

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def built_manifest_path(self) -> Path:
        return self.root / "built" / "manifest.json"

    def ensure_dirs(self) -> None:
        """Our directories, 0755 (QEMU may run as another user, libvirt-qemu: it must read bases);
        one found that is a link, not ours, or writable by others is refused."""
        try:
            for path in (self.root, self.artifacts_dir, self.root / "tmp", self.pins_dir):
                try:
                    path.mkdir(mode=0o755, parents=True)
                except FileExistsError:
                    pass
                _check_own_dir(path)
        except OSError as exc:
            raise ImageError(f"cache directory {self.root} is not usable: {exc}",
                             hint="set cache_dir in config or VMLOADER_CACHE_DIR to a writable directory",
                             phase="cache lookup") from None

    def scratch_dir(self, prefix: str) -> Path:
        self.ensure_dirs()
        return Path(tempfile.mkdtemp(prefix=prefix + "-", dir=self.root / "tmp"))

    def artifact_path(self, artifact: Artifact) -> Path:
        return self.artifacts_dir / artifact.sha256

    def has(self, artifact: Artifact) -> bool:
        path = self.artifact_path(artifact)
        return path.is_file() and path.stat().st_size == artifact.size

    def has_all(self, entry: ImageEntry) -> bool:
        return entry.fetchable and all(self.has(a) for a in entry.artifacts.values())

    def insert_file(self, source: Path, artifact: Artifact, *, move: bool = False, origin: str = "") -> Path:
        """Verify `source` against `artifact` and place it in the cache atomically.

        With move=True the source (a download or build output in the cache's tmp dir, ours)
        is made read-only, hashed as it lies on disk, and renamed into place, or deleted
        when it does not match. Otherwise its bytes are copied into a private temp file.
        """
        self.ensure_dirs()
        dest = self.artifact_path(artifact)
        if self.has(artifact):
            return dest
        if move:
            with os.fdopen(open_owned(source, os.O_RDONLY), "rb") as handle:
                os.fchmod(handle.fileno(), 0o444)      # from here on, only its owner could change it
                self._check(source, sha256_handle(handle), artifact, origin, discard=True)
            os.replace(source, dest)
            self.stamps.record(dest, artifact.sha256)
            ensure_pin_files(self.pins_dir, [artifact.sha256])
            return dest
        fd, tmp_name = tempfile.mkstemp(prefix=artifact.sha256[:12] + "-", dir=self.root / "tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                digest = hashlib.sha256()
                for block in iter(lambda: src.read(CHUNK), b""):
                    digest.update(block)
                    out.write(block)
                os.fchmod(out.fileno(), 0o444)
            self._check(source, digest.hexdigest(), artifact, origin, discard=False)
            tmp.replace(dest)
            self.stamps.record(dest, artifact.sha256)
            ensure_pin_files(self.pins_dir, [artifact.sha256])
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    @staticmethod
    def _check(source: Path, actual: str, artifact: Artifact, origin: str, discard: bool) -> None:
        if actual == artifact.sha256:
            return
        if discard:
            Path(source).unlink(missing_ok=True)
        raise ImageError(f"{origin or source}: sha256 mismatch: expected {artifact.sha256}, got {actual}",
                         hint="the file is corrupt or the manifest is stale; it was not cached",
                         phase="cache lookup")

    def drop_damaged(self, entry: ImageEntry) -> list:
        """Cached artifacts of `entry` whose bytes changed (or were cut short) since they were
        verified: removed, and named in the returned list."""
        damaged = []
        for kind, artifact in entry.artifacts.items():
            if self.artifact_path(artifact).is_file() and not check_intact(self.artifact_path(artifact), artifact.sha256, self.stamps,
                                                       sha256_file, self._remove_damaged):
                damaged.append(f"{entry.ref} {kind} ({artifact.sha256[:12]})")
        return damaged

    def _remove_damaged(self, sha256: str) -> None:
        try:
            remove_artifact(self.artifacts_dir / sha256)
            self.index.forget(sha256)
        except (OSError, sqlite3.Error) as exc:
            raise ImageError(f"the cached file {self.artifacts_dir / sha256} is damaged (its sha256 no longer "
                             f"matches) and cannot be removed: {exc}",
                             hint=f"ask the cache's owner to run `vmloader images verify` on {self.root}",
                             phase="cache lookup") from None

    def verify_all(self) -> list:
        """Re-hash every cached artifact; remove and return the ones whose bytes changed."""
        bad = []
        if self.artifacts_dir.is_dir():
            for path in sorted(self.artifacts_dir.iterdir()):
                if not stat.S_ISREG(os.lstat(path).st_mode) or _hash_nofollow(path) != path.name:
                    path.unlink()
                    self.index.forget(path.name)
                    bad.append(path.name)
        return bad

    def built_manifest(self) -> Manifest:
        return load_manifest(self.built_manifest_path)

    def record_built(self, entry: ImageEntry) -> None:
        """Keep one built version per name: the newest build replaces older ones."""
        current = [e for e in self.built_manifest().images if e.name != entry.name]
        write_manifest(Manifest(tuple(current) + (entry,)), self.built_manifest_path)

    @property
    def custom_manifest_path(self) -> Path:
        return self.root / "custom" / "manifest.json"

    def add_custom(self, entry: ImageEntry, files: Mapping[str, Path]) -> ImageEntry:
        """Register a user's own image files (hashed and copied in) under entry.name."""
        artifacts = {}
        for kind, path in files.items():
            art = Artifact(url=str(path), sha256=sha256_file(path), size=path.stat().st_size)
            self.insert_file(path, art)
            artifacts[kind] = art
        return self.record_custom(replace(entry, artifacts=artifacts))

    def record_custom(self, entry: ImageEntry) -> ImageEntry:
        """Remember an image whose artifacts are already cached; a name keeps one version."""
        others = [e for e in load_manifest(self.custom_manifest_path).images if e.name != entry.name]
        write_manifest(Manifest(tuple(others) + (entry,)), self.custom_manifest_path)
        self._record_use(entry)
        return entry

    def _catalogs(self, problems: list) -> "list[tuple[str, Optional[Repository], Manifest]]":
        """(label, repository to fetch from or None when local, manifest) for each catalog."""
        sources: "list[tuple[str, Optional[Repository], Manifest]]" = [
            ("local builds", None, self.built_manifest()),
            ("custom images", None, load_manifest(self.custom_manifest_path))]
        for repo in self.repositories:
            try:
                sources.append((repo.name, repo, repo.manifest()))
            except ImageError as exc:           # one mirror down must not stop the others
                problems.append(exc)
        return sources

    def known_names(self) -> list:
        names = set(load_manifest(self.embedded).names())
        for _, _, manifest in self._catalogs([]):
            names.update(manifest.names())
        return sorted(names)

    def cached_names(self) -> list:
        """Image names (and aliases) a job could start from without downloading anything."""
        return sorted(self.cached_entries())

    def cached_entries(self) -> dict:
        """{name (or alias): its entry} for the images a job could start from without downloading."""
        found: dict = {}
        for _, _, manifest in self._catalogs([]):
            for name in manifest.names():
                entry = manifest.find(name, need_artifacts=True)
                if entry is not None and name not in found and self.has_all(entry):
                    found[name] = entry
        return found

    def resolve(self, ref: str) -> ResolvedImage:
        """Find `ref` (name or name@version), making sure every artifact is cached and verified.

        Repositories are tried in order (mirrors): a failed fetch moves on to the next.
        """
        local = self._cached_exact(ref)
        if local is not None:
            return local
        problems: list = []
        damaged: list = []
        for _, repo, manifest in self._catalogs(problems):
            entry = manifest.find(ref, need_artifacts=True)
            if entry is None:
                continue
            damaged += self.drop_damaged(entry)
            try:
                for artifact in entry.artifacts.values():
                    if not self.has(artifact) and repo is not None:
                        repo.fetch(entry, artifact, self)
            except ImageError as exc:
                problems.append(exc)
                continue
            if self.has_all(entry):
                self._record_use(entry)
                if self.max_bytes:
                    self._evict_quietly(keep=[a.sha256 for a in entry.artifacts.values()])
                return ResolvedImage(entry, {k: self.artifact_path(a) for k, a in entry.artifacts.items()})
        if damaged:
            self._raise_damaged(ref, damaged, problems)
        if problems:
            raise problems[-1]
        self._raise_unknown(ref)

    @staticmethod
    def _raise_damaged(ref: str, damaged: list, problems: list) -> NoReturn:
        why = f"; fetching it again failed: {problems[-1].message}" if problems else ""
        raise ImageError(f"the cached {', '.join(damaged)} was damaged (its sha256 no longer matches what was "
                         f"verified) and has been removed{why}",
                         hint=f"run `vmloader images build {ref.partition('@')[0]}` (as root) or configure a "
                              "repository to fetch it again; `vmloader images verify` checks the whole cache",
                         phase="cache lookup")

    def _cached_exact(self, ref: str) -> Optional[ResolvedImage]:
        """`name@version` already cached: answer from saved manifests, without any network.

        (A bare name may have a newer version upstream, so it asks the repositories,
        with a conditional request, falling back to the saved manifest when they are down.)
        """
        if "@" not in ref:
            return None
        for repo in self.repositories:
            saved = getattr(repo, "saved_manifest", lambda: None)()
            entry = saved.find(ref, need_artifacts=True) if saved else None
            if entry is not None and self.has_all(entry) and not self.drop_damaged(entry):
                self._record_use(entry)
                return ResolvedImage(entry, {k: self.artifact_path(a) for k, a in entry.artifacts.items()})
        return None

    def _raise_unknown(self, ref: str) -> NoReturn:
        name = ref.partition("@")[0]
        if load_manifest(self.embedded).find(name) is not None:
            raise ImageError(f"image {ref} is not built on this worker yet",
                             hint=f"run `vmloader images build {name}` (as root), or configure a repository",
                             phase="cache lookup")
        known = ", ".join(self.known_names()) or "none"
        raise ImageError(f"unknown image {ref!r}; known images: {known}",
                         hint="check the name (vmloader images list)", phase="cache lookup")


def owns(root: Path) -> bool:
    """We write this cache: we own its root, or it does not exist yet (we will make it)."""
    owner = owner_of(Path(root))
    return owner is None or owner == os.geteuid()


def _hash_nofollow(path: Path) -> str:
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as handle:
        return sha256_handle(handle)


def _check_own_dir(path: Path) -> None:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise ImageError(f"refusing the cache directory {path}: it is "
                         f"{'not a directory' if not stat.S_ISDIR(st.st_mode) else f'owned by uid {st.st_uid}'}",
                         hint="the cache's owner is its only writer: remove it, or use another cache_dir",
                         phase="cache lookup")
    if st.st_mode & (0o022 | stat.S_ISGID):
        os.chmod(path, 0o755)             # ours but set up the old (group-writable) way


def _tighten_dir(path: Path, deep: bool) -> None:
    """Remove from `path` what is not ours (links included); the rest loses group/other write."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        _remove_any(path, st)
        return
    os.chmod(path, 0o755)
    for child in path.iterdir():
        cst = os.lstat(child)
        if stat.S_ISLNK(cst.st_mode) or cst.st_uid != os.geteuid():
            _remove_any(child, cst)
        elif deep and stat.S_ISREG(cst.st_mode):
            os.chmod(child, stat.S_IMODE(cst.st_mode) & ~0o022)
        elif deep and stat.S_ISDIR(cst.st_mode):
            _tighten_dir(child, deep)


def _remove_any(path: Path, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.unlink(path)

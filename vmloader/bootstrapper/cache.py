"""The verified local image cache on a worker.

Artifacts are stored by content: `artifacts/<sha256>`. A file only gets
there through `insert_file`, which hashes it first and renames it into place,
so a cache entry is always complete and verified. Images built on this
worker are listed in `built/manifest.json`; repositories (directories now,
HTTP mirrors later) are asked through the `Repository` interface.
"""
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence
from urllib.parse import urlparse

from .catalog import (ARTIFACT_KINDS, EMBEDDED_MANIFEST, Artifact, ImageEntry, Manifest,
                      load_manifest, write_manifest)
from .errors import ImageError

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class Repository(Protocol):
    """Where images come from: a catalog plus a way to get an artifact's file."""

    name: str

    def manifest(self) -> Manifest: ...

    def fetch(self, entry: ImageEntry, artifact: Artifact, cache: "ImageCache") -> Path: ...


@dataclass(frozen=True)
class DirectoryRepository:
    """A repository that is a plain directory: manifest.json plus artifact files."""

    root: Path

    @property
    def name(self) -> str:
        return str(self.root)

    def manifest(self) -> Manifest:
        return load_manifest(self.root / "manifest.json")

    def fetch(self, entry: ImageEntry, artifact: Artifact, cache: "ImageCache") -> Path:
        source = Path(artifact.url) if os.path.isabs(artifact.url) else self.root / artifact.url
        if not source.exists():
            raise ImageError(f"{entry.ref}: artifact {artifact.url} is missing from repository {self.root}",
                             hint="republish the image into the repository", phase="cache lookup")
        return cache.insert_file(source, artifact, move=False)


def repository_for(location: str) -> Repository:
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return DirectoryRepository(Path(parsed.path if parsed.scheme else location))
    raise ImageError(f"repository {location!r}: scheme {parsed.scheme!r} is not supported yet",
                     hint="use a directory path or file:// URL")


@dataclass(frozen=True)
class ResolvedImage:
    entry: ImageEntry
    paths: Mapping[str, Path]

    @property
    def disk(self) -> Path:
        return self.paths["disk"]

    @property
    def kernel(self) -> Path:
        return self.paths["kernel"]

    @property
    def initrd(self) -> Path:
        return self.paths["initrd"]


class ImageCache:
    def __init__(self, root: Path, repositories: Sequence[Repository] = (),
                 embedded: Path = EMBEDDED_MANIFEST):
        self.root = Path(root)
        self.repositories = list(repositories)
        self.embedded = embedded

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def built_manifest_path(self) -> Path:
        return self.root / "built" / "manifest.json"

    def _ensure_dirs(self) -> None:
        try:
            for path in (self.root, self.artifacts_dir, self.root / "tmp"):
                path.mkdir(parents=True, exist_ok=True)
                # QEMU may run as another user (libvirt-qemu): it must read bases.
                os.chmod(path, 0o755)
        except OSError as exc:
            raise ImageError(f"cache directory {self.root} is not usable: {exc}",
                             hint="set cache_dir in config or VMLOADER_CACHE_DIR to a writable directory",
                             phase="cache lookup") from None

    def scratch_dir(self, prefix: str) -> Path:
        self._ensure_dirs()
        return Path(tempfile.mkdtemp(prefix=prefix + "-", dir=self.root / "tmp"))

    def artifact_path(self, artifact: Artifact) -> Path:
        return self.artifacts_dir / artifact.sha256

    def has(self, artifact: Artifact) -> bool:
        path = self.artifact_path(artifact)
        return path.is_file() and path.stat().st_size == artifact.size

    def has_all(self, entry: ImageEntry) -> bool:
        return entry.fetchable and all(self.has(a) for a in entry.artifacts.values())

    def insert_file(self, source: Path, artifact: Artifact, *, move: bool = False) -> Path:
        """Verify `source` against `artifact` and place it in the cache atomically."""
        self._ensure_dirs()
        dest = self.artifact_path(artifact)
        if self.has(artifact):
            return dest
        fd, tmp_name = tempfile.mkstemp(prefix=artifact.sha256[:12] + "-", dir=self.root / "tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                digest = hashlib.sha256()
                for block in iter(lambda: src.read(CHUNK), b""):
                    digest.update(block)
                    out.write(block)
            actual = digest.hexdigest()
            if actual != artifact.sha256:
                raise ImageError(f"{source}: sha256 mismatch: expected {artifact.sha256}, got {actual}",
                                 hint="the file is corrupt or the manifest is stale; it was not cached",
                                 phase="cache lookup")
            os.chmod(tmp, 0o444)
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        if move:
            Path(source).unlink(missing_ok=True)
        return dest

    def built_manifest(self) -> Manifest:
        return load_manifest(self.built_manifest_path)

    def record_built(self, entry: ImageEntry) -> None:
        """Keep one built version per name: the newest build replaces older ones."""
        current = [e for e in self.built_manifest().images if e.name != entry.name]
        write_manifest(Manifest(tuple(current) + (entry,)), self.built_manifest_path)

    def _catalogs(self) -> list:
        sources = [("local builds", None, self.built_manifest())]
        sources += [(repo.name, repo, repo.manifest()) for repo in self.repositories]
        return sources

    def known_names(self) -> list:
        names = set(load_manifest(self.embedded).names())
        for _, _, manifest in self._catalogs():
            names.update(manifest.names())
        return sorted(names)

    def resolve(self, ref: str) -> ResolvedImage:
        """Find `ref` (name or name@version), making sure every artifact is cached and verified."""
        for label, repo, manifest in self._catalogs():
            entry = manifest.find(ref, need_artifacts=True)
            if entry is None:
                continue
            if repo is not None:
                for artifact in entry.artifacts.values():
                    if not self.has(artifact):
                        repo.fetch(entry, artifact, self)
            if self.has_all(entry):
                return ResolvedImage(entry, {k: self.artifact_path(entry.artifacts[k]) for k in ARTIFACT_KINDS})
        self._raise_unknown(ref)

    def _raise_unknown(self, ref: str) -> None:
        name = ref.partition("@")[0]
        if load_manifest(self.embedded).find(name) is not None:
            raise ImageError(f"image {ref} is not built on this worker yet",
                             hint=f"run `vmloader images build {name}` (as root), or configure a repository",
                             phase="cache lookup")
        known = ", ".join(self.known_names()) or "none"
        raise ImageError(f"unknown image {ref!r}; known images: {known}",
                         hint="check the name (vmloader images list)", phase="cache lookup")

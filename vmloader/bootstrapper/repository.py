"""Where images come from: a catalog (manifest.json) plus a way to fetch artifacts.

A repository is a directory or an HTTP(S) URL with `manifest.json` at its
root and artifact URLs relative to it (or absolute). The same layout works
from `vmloader repo serve` or any stock web server.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol
from urllib.parse import urljoin, urlparse

from .catalog import Artifact, ImageEntry, Manifest, atomic_write_text, load_manifest, parse_manifest
from .download import Progress, artifact_lock, download
from .errors import ImageError
from .ownedfiles import owner_of, read_trusted

if TYPE_CHECKING:
    import requests

    from .cache import ImageCache


def new_session() -> "requests.Session":
    """An HTTP session (honours HTTP(S)_PROXY); `requests` is imported only when one is needed:
    it costs a job's start-up a noticeable part of a second."""
    import requests
    return requests.Session()


class Repository(Protocol):
    @property
    def name(self) -> str: ...

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
        return cache.insert_file(source, artifact)


@dataclass
class HttpRepository:
    """An HTTP(S) repository. The manifest is refreshed with If-None-Match and kept
    on disk, so a worker keeps running cached images while the repository is down."""

    base_url: str
    state_dir: Path                  # where the last manifest and its ETag are kept
    session: requests.Session = field(default_factory=new_session)   # honours HTTP(S)_PROXY

    @property
    def name(self) -> str:
        return self.base_url

    def _saved(self) -> Path:
        safe = "".join(c if c.isalnum() else "_" for c in self.base_url)[:120]
        return self.state_dir / "manifests" / f"{safe}.json"

    def manifest(self) -> Manifest:
        import requests
        saved = self._load_saved()
        url = urljoin(self.base_url, "manifest.json")
        headers = {"If-None-Match": saved["etag"]} if saved and saved.get("etag") else {}
        try:
            resp = self.session.get(url, headers=headers, timeout=(10, 30))
        except requests.RequestException as exc:
            if saved:
                return parse_manifest(saved["manifest"], f"{url} (saved copy; repository unreachable)")
            raise ImageError(f"repository {self.base_url} is unreachable: {exc}",
                             hint="check the URL and the network, or configure a mirror",
                             phase="cache lookup") from None
        if resp.status_code == 304 and saved:
            return parse_manifest(saved["manifest"], url)
        if resp.status_code != 200:
            raise ImageError(f"{url}: HTTP {resp.status_code}", hint="check the repository URL", phase="cache lookup")
        try:
            data = resp.json()
        except ValueError as exc:
            raise ImageError(f"malformed manifest {url}: not JSON: {exc}", phase="cache lookup") from None
        manifest = parse_manifest(data, url)
        self._save({"etag": resp.headers.get("ETag"), "manifest": data})
        return manifest

    def saved_manifest(self) -> Optional[Manifest]:
        """The manifest as last fetched, without touching the network."""
        saved = self._load_saved()
        try:
            return parse_manifest(saved["manifest"], str(self._saved())) if saved else None
        except ImageError:
            return None

    def _load_saved(self) -> Optional[dict]:
        """The saved copy, trusted only when the cache's writer made it (owns it, nobody else may
        write it): anything else is ignored, and the manifest is fetched again."""
        writer = owner_of(self.state_dir)
        raw = read_trusted(self._saved(), os.geteuid() if writer is None else writer)
        try:
            record = json.loads(raw) if raw is not None else None
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def _save(self, record: dict) -> None:
        atomic_write_text(self._saved(), json.dumps(record))

    def fetch(self, entry: ImageEntry, artifact: Artifact, cache: "ImageCache") -> Path:
        return fetch_into_cache(self.session, urljoin(self.base_url, artifact.url), artifact, cache,
                                f"{entry.ref} {Path(artifact.url).name}")


def fetch_into_cache(session: requests.Session, url: str, artifact: Artifact, cache: "ImageCache",
                     label: str) -> Path:
    """Download once per worker (a lock per artifact), verify, and place in the cache."""
    cache.ensure_dirs()
    tmp = cache.tmp_dir
    with artifact_lock(tmp / f"{artifact.sha256}.lock"):
        if cache.has(artifact):              # another process fetched it while we waited
            return cache.artifact_path(artifact)
        part = tmp / f"{artifact.sha256}.part"
        progress = (cache.progress or Progress)(label, artifact.size)
        download(session, url, artifact, part, progress=progress)
        return cache.insert_file(part, artifact, move=True, origin=url)   # hashed again, from disk


def is_url(ref: str) -> bool:
    return urlparse(ref).scheme in ("http", "https")


def url_image(url: str, sha256: Optional[str], cache: "ImageCache",
              session: Optional[requests.Session] = None) -> ImageEntry:
    """`--image https://.../x.qcow2`: a bare disk, verified by --sha256 or the `.sha256` file beside it.

    It boots its own boot loader (firmware boot) and is remembered as a custom image.
    """
    import requests
    session = session or new_session()
    sha256 = (sha256 or _sidecar_sha256(session, url)).lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ImageError(f"--sha256 {sha256!r} is not a sha256 (64 hex digits)", phase="cache lookup")
    try:
        head = session.head(url, allow_redirects=True, timeout=(10, 30))
        head.raise_for_status()
        size = int(head.headers["Content-Length"])
    except (requests.RequestException, KeyError, ValueError) as exc:
        raise ImageError(f"{url}: cannot find the image's size: {exc}",
                         hint="check the URL; the server must send Content-Length", phase="cache lookup") from None
    artifact = Artifact(url, sha256, size)
    fetch_into_cache(session, url, artifact, cache, Path(urlparse(url).path).name)
    entry = ImageEntry(name=url, version=sha256[:12], boot="firmware", artifacts={"disk": artifact})
    return cache.record_custom(entry)


def _sidecar_sha256(session: requests.Session, url: str) -> str:
    import requests
    try:
        resp = session.get(url + ".sha256", timeout=(10, 30))
        resp.raise_for_status()
    except requests.RequestException as exc:
        raise ImageError(f"no --sha256 given and {url}.sha256 could not be fetched: {exc}",
                         hint="pass --sha256 HEX, or publish a .sha256 file beside the image",
                         phase="cache lookup") from None
    words = resp.text.split()
    return words[0] if words else ""


def repository_for(location: str, state_dir: Path) -> Repository:
    parsed = urlparse(location)
    if parsed.scheme in ("http", "https"):
        return HttpRepository(location if location.endswith("/") else location + "/", state_dir)
    if parsed.scheme in ("", "file"):
        return DirectoryRepository(Path(parsed.path if parsed.scheme else location))
    raise ImageError(f"repository {location!r}: unsupported scheme {parsed.scheme!r}",
                     hint="use a directory, file://, http:// or https:// URL")

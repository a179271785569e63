"""The shared cache's one writer as a local service, and the reader side that uses it.

A worker's shared cache (e.g. /var/cache/vmloader) is written only by its owner
(root or a dedicated system user). Job users read it: artifacts are 0444 in
0755 directories they cannot write. What a job needs and the cache lacks, it
asks the owner's `vmloader cache serve` for, over a Unix stream socket
(`<cache>/service.sock`, mode 0666: any local user may ask, and all they can
ask for is an image the configured repositories offer):

    request  (one JSON line, at most 4 KiB): {"op": "resolve", "ref": "debian-12"}
    replies  (JSON lines): {"progress": {"label": ..., "done": N, "total": N}} ...
             then {"ok": true, "entry": {...}, "paths": {"disk": ...}}
               or {"ok": false, "error": "...", "hint": "..."}

The service resolves exactly as the writer always did (download under the
per-artifact lock, so N clients at once cause one download; verify; index; evict).
With no service running, an image already fully cached still resolves read-only,
from the writer's saved manifests and stamps, with no network. A user's own
images (`images add`, `--image URL`) live in a private cache of their own
(user_cache_dir, 0700), looked up first for that user only.
"""
import json
import os
import re
import socket
import socketserver
import stat
import struct
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator, Optional

from .cache import ImageCache, ResolvedImage, legacy_fix_command, sha256_file
from .cacheindex import SHA256, pinned
from .catalog import EMBEDDED_MANIFEST, ImageEntry, Manifest, load_manifest, parse_manifest
from .download import Progress
from .errors import ImageError, VMLoaderError
from .integrity import Stamps
from .ownedfiles import owner_of, read_trusted
from .serving import serve_until_signalled
from .warmkeeper import WarmKeeper, lanes_wanted

MAX_REQUEST = 4096
MAX_REPLY = 1 << 20
REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}(@[A-Za-z0-9][A-Za-z0-9._+-]{0,127})?")
OPS = ("resolve",)


def parse_request(line: bytes) -> dict:
    """A client's request, strictly: anything unexpected is refused before it reaches the cache."""
    if len(line) > MAX_REQUEST or not line.endswith(b"\n"):
        raise ImageError(f"request too long or not one line (at most {MAX_REQUEST} bytes)")
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ImageError("request is not JSON") from None
    if not isinstance(request, dict) or set(request) != {"op", "ref"} or request["op"] not in OPS:
        raise ImageError('expected {"op": "resolve", "ref": NAME[@VERSION]}')
    if not isinstance(request["ref"], str) or not REF.fullmatch(request["ref"]):
        raise ImageError(f"{str(request['ref'])[:80]!r} is not an image name (letters, digits, . _ + -)")
    return request


def peer(sock: socket.socket) -> tuple:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED)."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))


class RemoteProgress:
    """download.Progress's interface, sent to the client as JSON lines (every 1%)."""

    def __init__(self, label: str, total: int, send: Callable[[dict], None]):
        self.label, self.total, self.send = label, max(total, 1), send
        self.last_step = -1

    def update(self, done: int) -> None:
        step = int(min(done / self.total, 1.0) * 100)
        if step != self.last_step:
            self.last_step = step
            self.send({"progress": {"label": self.label, "done": done, "total": self.total}})


class _Handler(socketserver.StreamRequestHandler):
    server: "CacheServer"

    def handle(self) -> None:
        pid, uid, _ = peer(self.request)
        try:
            request = parse_request(self.rfile.readline(MAX_REQUEST + 1))
            self.server.log(f"uid {uid} pid {pid}: {request['op']} {request['ref']}")
            reply = self.server.resolve(request["ref"], self._send)
        except VMLoaderError as exc:
            self.server.log(f"uid {uid} pid {pid}: refused or failed: {exc.message}")
            reply = {"ok": False, "error": exc.message, "hint": exc.hint}
        except Exception as exc:                      # a bug must not take the service down
            self.server.log(f"uid {uid} pid {pid}: internal error:\n{traceback.format_exc()}")
            reply = {"ok": False, "error": f"internal error in the cache service: {exc}", "hint": ""}
        self._send(reply)

    def _send(self, message: dict) -> None:
        try:
            self.wfile.write(json.dumps(message).encode() + b"\n")
            self.wfile.flush()
        except OSError:
            pass                # the client left; the download goes on for the others


class CacheServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, make_cache: Callable[[], ImageCache], log: Callable[[str], None],
                 resolved: Callable[[], None] = lambda: None):
        self.make_cache, self.log, self.resolved = make_cache, log, resolved
        super().__init__(str(path), _Handler)

    def resolve(self, ref: str, send: Callable[[dict], None]) -> dict:
        cache = self.make_cache()
        cache.progress = lambda label, total: RemoteProgress(label, total, send)
        image = cache.resolve(ref)
        self.resolved()
        return {"ok": True, "entry": image.entry.to_dict(), "paths": {k: str(p) for k, p in image.paths.items()}}


def _clear_stale_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        raise ImageError(f"{path} exists and is not our socket", hint="remove it, or pass --socket PATH")
    os.unlink(path)


def serve(cfg, socket_path: Optional[Path] = None, ready: Callable[[], None] = lambda: None) -> None:
    """`vmloader cache serve`: run by the cache's owner, until killed."""
    cache = ImageCache.writer(cfg)
    cache.ensure_dirs()
    path = Path(socket_path or cfg.service_socket)
    _clear_stale_socket(path)
    log = lambda text: print(f"vmloader cache serve: {time.strftime('%H:%M:%S')} {text}", file=sys.stderr,
                             flush=True)
    keeper = _keeper(cfg, log)
    server = CacheServer(path, lambda: ImageCache.writer(cfg), log, keeper.wake if keeper else lambda: None)
    os.chmod(path, 0o666)
    if keeper is not None:
        keeper.start()

    def serving() -> None:          # once a SIGTERM would stop the server
        log(f"serving {cfg.cache_dir} on {path} (uid {os.geteuid()})")
        ready()
    try:
        stopped_by = serve_until_signalled(server, ready=serving)
    finally:
        server.server_close()
        path.unlink(missing_ok=True)
    if stopped_by:
        log(f"stopped by {stopped_by}")


def _keeper(cfg, log: Callable[[str], None]) -> Optional[WarmKeeper]:
    """The keeper of root's warm states (warmkeeper.py), when keep_warm names any image."""
    if not cfg.keep_warm:
        return None
    if not cfg.warm_start:
        log("keep_warm is set but warm_start is off: no warm states are kept")
        return None
    if os.geteuid() != 0:
        log("keep_warm is set, but only root's warm states serve other users' jobs: none are kept")
        return None
    log(f"keeping warm: {', '.join(cfg.keep_warm)} ({lanes_wanted(cfg)} lane(s) each, default shape)")
    return WarmKeeper(cfg, lambda: ImageCache.writer(cfg).cached_entries(), log)


# -- the reader side -------------------------------------------------------------------------------------


class ServiceUnavailable(Exception):
    pass


def ask_service(path: Path, ref: str, on_progress: Callable[[dict], None], timeout: float = 3600) -> dict:
    """Send one resolve request; progress lines go to `on_progress`; returns the final reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise ServiceUnavailable(str(exc)) from None
    with sock, sock.makefile("rb") as stream:
        sock.sendall(json.dumps({"op": "resolve", "ref": ref}).encode() + b"\n")
        for line in _lines(stream):
            message = json.loads(line)
            if isinstance(message, dict) and "progress" in message:
                on_progress(message["progress"])
            elif isinstance(message, dict) and "ok" in message:
                return message
    raise ImageError(f"the cache service at {path} closed the connection without an answer",
                     hint="see its log", phase="cache lookup")


def _lines(stream) -> Iterator[bytes]:
    while True:
        line = stream.readline(MAX_REPLY)
        if not line:
            return
        yield line


class _ProgressShown:
    """Shows the service's progress messages with the client's own bar or lines."""

    def __init__(self) -> None:
        self.bars: dict = {}

    def __call__(self, message: dict) -> None:
        label, total, done = str(message.get("label", ""))[:200], message.get("total"), message.get("done")
        if not isinstance(total, int) or not isinstance(done, int):
            return
        bar = self.bars.get(label) or self.bars.setdefault(label, Progress(label, total))
        bar.update(done)


class SharedCacheReader:
    """Another user's shared cache, read-only, plus this user's private cache for their own images."""

    def __init__(self, root: Path, socket_path: Path, private: ImageCache, repositories=()):
        self.root = Path(root)
        self.socket_path = Path(socket_path)
        self.private = private
        self.repositories = list(repositories)       # for their saved manifests (no network)
        self.writer = owner_of(self.root)
        self.stamps = Stamps(self.root / "verified", writer=self.writer)

    @classmethod
    def configured(cls, cfg) -> "SharedCacheReader":
        from .repository import repository_for
        root = Path(cfg.cache_dir)
        _refuse_legacy(root)
        private = ImageCache(cfg.own_cache_dir)
        return cls(root, cfg.service_socket, private, [repository_for(r, root) for r in cfg.repositories])

    # -- what a job needs --------------------------------------------------------------------------------
    def resolve(self, ref: str) -> ResolvedImage:
        if self._private_has(ref):
            return self.private.resolve(ref)
        try:
            reply = ask_service(self.socket_path, ref, _ProgressShown())
        except ServiceUnavailable as exc:
            found = self.resolve_cached(ref)
            if found is not None:
                return found
            raise ImageError(f"image {ref} is not in the shared cache {self.root}, and its cache service "
                             f"({self.socket_path}) is not running ({exc})",
                             hint="the cache's owner starts it with `vmloader cache serve` (see condor/README.md)",
                             phase="cache lookup") from None
        return self._from_reply(reply)

    def _from_reply(self, reply: dict) -> ResolvedImage:
        if not reply.get("ok"):
            raise ImageError(str(reply.get("error", "the cache service failed"))[:4000],
                             hint=str(reply.get("hint") or "")[:1000] or None, phase="cache lookup")
        entry = parse_manifest({"schema_version": 1, "images": [reply["entry"]]}, str(self.socket_path)).images[0]
        paths = {kind: self._artifact_path(art.sha256) for kind, art in entry.artifacts.items()}
        if {k: str(p) for k, p in paths.items()} != reply.get("paths"):
            raise ImageError(f"the cache service at {self.socket_path} answered paths outside {self.root}",
                             phase="cache lookup")
        return ResolvedImage(entry, paths)

    def _artifact_path(self, sha256: str) -> Path:
        if not SHA256.fullmatch(sha256):
            raise ImageError(f"{sha256!r} is not a sha256", phase="cache lookup")
        return self.root / "artifacts" / sha256

    def pin(self, image: ResolvedImage):
        if self._is_private(image):
            return self.private.pin(image)
        return pinned(self.root / "pins", [a.sha256 for a in image.entry.artifacts.values()], writer=self.writer)

    def _is_private(self, image: ResolvedImage) -> bool:
        return Path(image.disk).parent == self.private.artifacts_dir

    def has_all(self, entry: ImageEntry) -> bool:
        return self.private.has_all(entry) or (entry.fetchable and all(
            self._trusted_artifact(a.sha256, a.size) for a in entry.artifacts.values()))

    # -- read-only lookups (no service, no network) ---------------------------------------------------------
    def _trusted_artifact(self, sha256: str, size: int) -> bool:
        """A regular file of the right size in the writer's artifacts dir (only the writer names files
        there). Its owner is not checked: libvirt chowns direct-boot kernels to QEMU's user while a VM
        runs. Its bytes are: a stamp the writer made that still matches, or a fresh hash (_intact)."""
        try:
            st = os.lstat(self._artifact_path(sha256))
        except (OSError, ImageError):
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == size

    def _intact(self, sha256: str) -> bool:
        path = self._artifact_path(sha256)
        return self.stamps.unchanged(path, sha256) or sha256_file(path) == sha256

    def _manifests(self) -> list:
        found = [self._trusted_manifest(self.root / "built" / "manifest.json"),
                 self._trusted_manifest(self.root / "custom" / "manifest.json")]
        for repo in self.repositories:
            try:       # an HTTP repository's copy as the writer saved it; a directory's own (local) manifest
                found.append(repo.saved_manifest() if hasattr(repo, "saved_manifest") else repo.manifest())
            except ImageError:
                continue
        return [m for m in found if m is not None]

    def _trusted_manifest(self, path: Path) -> Optional[Manifest]:
        if self.writer is None:         # the shared cache had no owner (no root): no file of it is trusted
            return None
        raw = read_trusted(path, self.writer)
        try:
            return parse_manifest(json.loads(raw), str(path)) if raw is not None else None
        except (ValueError, ImageError):
            return None

    def resolve_cached(self, ref: str) -> Optional[ResolvedImage]:
        """An image the shared cache holds completely, from the writer's own manifests and stamps."""
        for manifest in self._manifests():
            entry = manifest.find(ref, need_artifacts=True)
            if entry is None or not self.has_all(entry):
                continue
            if all(self._intact(a.sha256) for a in entry.artifacts.values()):
                return ResolvedImage(entry, {k: self._artifact_path(a.sha256) for k, a in entry.artifacts.items()})
        return None

    def _private_has(self, ref: str) -> bool:
        if not self.private.root.is_dir():
            return False
        manifests = (load_manifest(self.private.custom_manifest_path), self.private.built_manifest())
        return any(m.find(ref, need_artifacts=True) is not None for m in manifests)

    def known_names(self) -> list:
        names = set(load_manifest(EMBEDDED_MANIFEST).names())
        for manifest in self._manifests():
            names.update(manifest.names())
        if self.private.root.is_dir():
            names.update(self.private.known_names())
        return sorted(names)

    def cached_names(self) -> list:
        return sorted(self.cached_entries())

    def cached_entries(self) -> dict:
        """{name: entry} of the shared cache's images, then of this user's own (as ImageCache's)."""
        found: dict = {}
        for manifest in self._manifests():
            for name in manifest.names():
                entry = manifest.find(name, need_artifacts=True)
                if entry is not None and name not in found and self.has_all(entry):
                    found[name] = entry
        if self.private.root.is_dir():
            for name, entry in self.private.cached_entries().items():
                found.setdefault(name, entry)
        return found

    # -- a user's own images go to the private cache --------------------------------------------------------
    def add_custom(self, entry: ImageEntry, files) -> ImageEntry:
        self._make_private()
        return self.private.add_custom(entry, files)

    def record_custom(self, entry: ImageEntry) -> ImageEntry:
        return self.private.record_custom(entry)

    def _make_private(self) -> None:
        self.private.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def ensure_dirs(self) -> None:          # (url_image downloads into the private cache)
        self._make_private()
        self.private.ensure_dirs()

    @property
    def progress(self):
        return self.private.progress

    def has(self, artifact) -> bool:
        return self.private.has(artifact)

    def artifact_path(self, artifact) -> Path:
        return self.private.artifact_path(artifact)

    def insert_file(self, source: Path, artifact, **kw) -> Path:
        return self.private.insert_file(source, artifact, **kw)

    @property
    def tmp_dir(self) -> Path:
        return self.private.tmp_dir

    def _not_ours(self, what: str):
        raise ImageError(f"{what} is for the shared cache's owner (uid {self.writer}); {self.root} is theirs",
                         hint=f"ask its owner, or set cache_dir to your own cache ({self.private.root})")

    def evict(self, *args, **kw):
        self._not_ours("pruning")

    def remove_image(self, name: str):
        self._not_ours("removing images")

    def verify_all(self):
        self._not_ours("`images verify`")

    def built_manifest(self) -> Manifest:
        return self._trusted_manifest(self.root / "built" / "manifest.json") or Manifest((), "")


def _refuse_legacy(root: Path) -> None:
    """A reader refuses a shared cache that others can still write (the old group-writable layout)."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return
    if st.st_mode & (0o022 | stat.S_ISGID) or not stat.S_ISDIR(st.st_mode):
        raise ImageError(f"the shared cache {root} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                         "any of them could plant files that you would boot",
                         hint=f"its owner (uid {st.st_uid}) runs `vmloader cache serve`, which tightens it, or: "
                              f"{legacy_fix_command(root)}", phase="cache lookup")

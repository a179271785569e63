"""The image catalog (manifest.json): what images exist and how to verify them.

A manifest lists image versions. An entry with `artifacts` can be fetched and
verified by sha256; an entry with only a `recipe` can be built locally
(`vmloader images build NAME`). `images/manifest.json` in the source tree is
the embedded default repository's catalog.
"""
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .errors import ImageError

SCHEMA_VERSION = 1
ARTIFACT_KINDS = ("disk", "kernel", "initrd")
# direct-kernel: ours, kernel and initrd beside the disk; bios (SeaBIOS) and uefi (OVMF): the
# disk's own boot loader. "firmware" is what older catalogues called bios.
BOOT_MODES = ("direct-kernel", "bios", "uefi", "firmware")
EMBEDDED_MANIFEST = Path(__file__).resolve().parents[2] / "images" / "manifest.json"


@dataclass(frozen=True)
class Artifact:
    url: str
    sha256: str
    size: int

    def to_dict(self) -> dict:
        return {"url": self.url, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class Recipe:
    suite: str
    packages: tuple
    init: str = "fast"          # "fast": vmloader-init + agent as PID 1; "systemd": agent as a unit

    def to_dict(self) -> dict:
        return {"suite": self.suite, "packages": list(self.packages), "init": self.init}


@dataclass(frozen=True)
class ImageEntry:
    name: str
    version: str
    arch: str = "x86_64"
    os_family: str = "linux"
    os_release: str = ""
    boot: str = "direct-kernel"
    cpus: int = 1
    memory_mib: int = 1024
    disk_gib: int = 4
    agent: str = "vmloader"
    cmdline: str = ""
    recipe: Optional[Recipe] = None
    artifacts: Mapping[str, Artifact] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def firmware(self) -> Optional[str]:
        """"bios" or "uefi" for an image with its own boot loader; None for direct kernel boot."""
        if self.boot == "direct-kernel":
            return None
        return "uefi" if self.boot == "uefi" else "bios"

    @property
    def buildable(self) -> bool:
        return self.recipe is not None

    @property
    def fetchable(self) -> bool:
        """A disk, plus kernel and initrd for direct kernel boot."""
        needed = ARTIFACT_KINDS if self.boot == "direct-kernel" else ("disk",)
        return all(kind in self.artifacts for kind in needed)

    def to_dict(self) -> dict:
        data = {"name": self.name, "version": self.version, "arch": self.arch,
                "os": {"family": self.os_family, "release": self.os_release},
                "boot": self.boot,
                "defaults": {"cpus": self.cpus, "memory_mib": self.memory_mib,
                             "disk_gib": self.disk_gib},
                "agent": self.agent, "cmdline": self.cmdline}
        if self.recipe:
            data["recipe"] = self.recipe.to_dict()
        if self.artifacts:
            data["artifacts"] = {k: a.to_dict() for k, a in self.artifacts.items()}
        return data


def version_key(version: str) -> tuple:
    """The leading dotted numbers of a version: "12.10.bc9f" -> (12, 10)."""
    numbers = []
    for part in version.split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


@dataclass(frozen=True)
class Manifest:
    images: Sequence[ImageEntry]
    source: str = ""

    def names(self) -> list:
        return sorted({e.name for e in self.images})

    def versions(self, name: str) -> list:
        """Oldest first. Versions compare by their numeric release part ("12.3" < "12.10");
        builds of one release ("12.<recipe hash>") by their order in the catalog, where
        publishing appends: the later entry is the newer build."""
        ordered = [(version_key(e.version), i, e) for i, e in enumerate(self.images) if e.name == name]
        return [e for _, _, e in sorted(ordered, key=lambda t: t[:2])]

    def find(self, ref: str, *, need_artifacts: bool = False) -> Optional[ImageEntry]:
        """`name` → newest version; `name@version` → that version."""
        name, _, version = ref.partition("@")
        candidates = [e for e in self.versions(name)
                      if (not version or e.version == version)
                      and (e.fetchable or not need_artifacts)]
        return candidates[-1] if candidates else None

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "images": [e.to_dict() for e in self.images]}


def _bad(source: str, where: str, problem: str) -> ImageError:
    return ImageError(f"malformed manifest {source}: at {where}: {problem}",
                      hint="fix the manifest (vmloader images validate FILE checks it)")


def _artifact(data, source: str, where: str) -> Artifact:
    if not isinstance(data, dict):
        raise _bad(source, where, "expected an object with url, sha256, size")
    url, sha, size = data.get("url"), data.get("sha256"), data.get("size")
    if not isinstance(url, str) or not url:
        raise _bad(source, where + ".url", "expected a non-empty string")
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise _bad(source, where + ".sha256", "expected 64 lowercase hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(source, where + ".size", "expected a whole number of bytes")
    return Artifact(url, sha, size)


def _entry(data, source: str, where: str) -> ImageEntry:
    if not isinstance(data, dict):
        raise _bad(source, where, "expected an object")
    for key in ("name", "version"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise _bad(source, f"{where}.{key}", "expected a non-empty string")
    if data.get("boot", "direct-kernel") not in BOOT_MODES:
        raise _bad(source, where + ".boot", f"unknown boot mode {data.get('boot')!r}; known: {', '.join(BOOT_MODES)}")
    osinfo = data.get("os") or {}
    defaults = data.get("defaults") or {}
    recipe = None
    if "recipe" in data:
        r = data["recipe"]
        if not isinstance(r, dict) or not isinstance(r.get("suite"), str):
            raise _bad(source, where + ".recipe", "expected an object with a suite")
        recipe = Recipe(r["suite"], tuple(r.get("packages", ())), r.get("init", "fast"))
    artifacts = {}
    for kind, art in (data.get("artifacts") or {}).items():
        if kind not in ARTIFACT_KINDS:
            raise _bad(source, f"{where}.artifacts.{kind}", f"unknown artifact kind; known: {', '.join(ARTIFACT_KINDS)}")
        artifacts[kind] = _artifact(art, source, f"{where}.artifacts.{kind}")
    if data.get("boot", "direct-kernel") != "direct-kernel" and artifacts.keys() & {"kernel", "initrd"}:
        raise _bad(source, where + ".artifacts", f"an image booted by its own boot loader (boot {data['boot']}) "
                   "carries its disk only, no kernel or initrd")
    return ImageEntry(
        name=data["name"], version=data["version"], arch=data.get("arch", "x86_64"),
        os_family=osinfo.get("family", "linux"), os_release=str(osinfo.get("release", "")),
        boot=data.get("boot", "direct-kernel"), cpus=int(defaults.get("cpus", 1)),
        memory_mib=int(defaults.get("memory_mib", 1024)), disk_gib=int(defaults.get("disk_gib", 4)),
        agent=data.get("agent", "vmloader"), cmdline=data.get("cmdline", ""),
        recipe=recipe, artifacts=artifacts)


def parse_manifest(data, source: str = "<manifest>") -> Manifest:
    if not isinstance(data, dict):
        raise _bad(source, "$", "expected a JSON object")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise _bad(source, "$.schema_version", f"expected {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
    images = data.get("images")
    if not isinstance(images, list):
        raise _bad(source, "$.images", "expected a list")
    return Manifest(tuple(_entry(e, source, f"$.images[{i}]") for i, e in enumerate(images)), source)


def load_manifest(path: Path, *, missing_ok: bool = True) -> Manifest:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        if not missing_ok:
            raise ImageError(f"no manifest at {path}", hint="give the path of a manifest.json") from None
        return Manifest((), str(path))
    except OSError as exc:
        raise ImageError(f"cannot read manifest {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(str(path), f"line {exc.lineno} column {exc.colno}", exc.msg) from None
    return parse_manifest(data, str(path))


def atomic_write_text(path: Path, text: str) -> None:
    """Write so readers never see half a file, and concurrent writers (other
    processes, other users of a shared cache) never trip over each other's
    temporary file: each gets its own, and the last rename wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", dir=path.parent)   # private, O_EXCL
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            os.fchmod(handle.fileno(), 0o644 & ~_umask())     # on the fd: never through a swapped name
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_manifest(manifest: Manifest, path: Path) -> None:
    atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")

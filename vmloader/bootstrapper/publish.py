"""`vmloader images publish DIR`: put locally built (or added) images into a repository directory.

Artifacts land at `DIR/<name>/<version>/<file>` and the manifest is merged
(other images already published there are kept), written atomically last, so
a repository never lists a file that is not there yet.
"""
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from .cache import ImageCache, sha256_file
from .catalog import Manifest, load_manifest, write_manifest
from .errors import ImageError


def publish(cache: ImageCache, repo_dir: Path, names: Sequence[str] = ()) -> list:
    """Images built here (all of them when no names are given) and, by name, images added here
    (`images add`: a stock image with its boot mode, or a disk with its kernel and initrd)."""
    chosen = [e for e in cache.built_manifest().images if not names or e.name in names]
    chosen += [e for e in load_manifest(cache.custom_manifest_path).images
               if e.name in names and e.name not in {c.name for c in chosen}]
    missing = set(names) - {e.name for e in chosen}
    if missing or not chosen:
        raise ImageError(f"nothing built or added here to publish: {', '.join(sorted(missing)) or 'no images'}",
                         hint="build first (vmloader images build NAME) or add the disk (vmloader images add "
                              "NAME --disk FILE)")
    for entry in chosen:
        if not cache.has_all(entry):
            raise ImageError(f"{entry.ref} is not complete in the cache {cache.root}",
                             hint=f"pull or add it again (vmloader images pull {entry.name})")
    repo_dir.mkdir(parents=True, exist_ok=True)
    published = [_copy_entry(cache, entry, repo_dir) for entry in chosen]
    current = load_manifest(repo_dir / "manifest.json").images
    refs = {e.ref for e in published}
    write_manifest(Manifest(tuple(e for e in current if e.ref not in refs) + tuple(published)),
                   repo_dir / "manifest.json")
    return published


def _copy_entry(cache: ImageCache, entry, repo_dir: Path):
    artifacts = {}
    for kind, art in entry.artifacts.items():
        relative = f"{entry.name}/{entry.version}/{Path(art.url).name}"
        dest = repo_dir / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        # by sha256, not size: a rebuild of the same version has the same size and other bytes
        if not (dest.is_file() and dest.stat().st_size == art.size and sha256_file(dest) == art.sha256):
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            shutil.copyfile(cache.artifact_path(art), tmp)
            tmp.chmod(0o644)
            tmp.replace(dest)
        artifacts[kind] = replace(art, url=relative)
    return replace(entry, artifacts=artifacts)

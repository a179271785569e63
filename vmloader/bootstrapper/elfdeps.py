"""What a dynamically linked program needs from its own tree: its ELF interpreter and the shared
libraries it names, found inside that tree and never on the host, for an initramfs to carry.

The tree is an image's root (debootstrap's): its symlinks are followed as the guest would see them,
absolute ones from the tree's root, and none leads out of it.
"""
import os
import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# Where Debian's ld.so looks for a library when it has no ld.so.cache (an initramfs has none):
# the multiarch directories, then the plain ones.
LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB = 0, 1, 5
MAX_LINKS = 40          # as the kernel: a longer chain is a loop


def inside(root: Path, name: str) -> Optional[Path]:
    """The regular file `name` (a path in the tree, absolute or not) is in the tree at `root`,
    symlinks resolved component by component within the tree; None if there is none."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    done: List[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        path = root.joinpath(*done, part)
        if path.is_symlink():
            links += 1
            if links > MAX_LINKS:
                return None
            target = os.readlink(path)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        done.append(part)
    found = root.joinpath(*done)              # (no component of it is a symlink: each was resolved)
    return found if done and found.is_file() else None


def dynamic(data: bytes) -> Optional[Tuple[Optional[str], List[str]]]:
    """(interpreter, names of the libraries it needs) of a little-endian 64-bit ELF file; None if
    `data` is not one or cannot be read as one."""
    if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
        return None
    try:
        phoff, = struct.unpack_from("<Q", data, 32)
        phentsize, phnum = struct.unpack_from("<HH", data, 54)
        interpreter, table, loads = None, None, []
        for i in range(phnum):
            p_type, _, offset, vaddr, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
            if p_type == PT_INTERP:
                interpreter = data[offset:offset + filesz].split(b"\0")[0].decode()
            elif p_type == PT_DYNAMIC:
                table = (offset, filesz)
            elif p_type == PT_LOAD:
                loads.append((vaddr, offset, filesz))
        if table is None:
            return interpreter, []
        needed, strtab = [], None
        for pos in range(table[0], table[0] + table[1] - 15, 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                needed.append(value)
            elif tag == DT_STRTAB:
                strtab = value
        if not needed:
            return interpreter, []
        if strtab is None:
            return None
        base = next((offset + strtab - vaddr for vaddr, offset, size in loads if vaddr <= strtab < vaddr + size), None)
        if base is None:
            return None
        return interpreter, [data[base + at:data.index(b"\0", base + at)].decode() for at in needed]
    except (struct.error, ValueError, UnicodeDecodeError):
        return None


def _library(root: Path, soname: str) -> Optional[Tuple[str, Path]]:
    """(where the loader finds `soname`, relative to the root; the file) in the tree, or None."""
    for directory in LIBRARY_DIRS:
        path = inside(root, f"{directory}/{soname}")
        if path is not None:
            return f"{directory}/{soname}", path
    return None


def libraries(root: Path, program: bytes) -> Optional[Dict[str, bytes]]:
    """Everything the ELF `program` needs to run in the tree at `root`, its libraries' own needs
    included: {path relative to the root, where the loader will look for it: bytes}. None when the
    program or a library is not a readable 64-bit little-endian ELF, or a library is not in the tree."""
    found: Dict[str, bytes] = {}
    seen = set()                               # sonames already found
    pending = [program]
    while pending:
        parsed = dynamic(pending.pop(0))
        if parsed is None:
            return None
        interpreter, needed = parsed
        loader = interpreter.lstrip("/") if interpreter is not None else None
        if loader is not None and loader not in found:
            path = inside(root, loader)
            if path is None:
                return None
            found[loader] = path.read_bytes()
        for soname in needed:
            if "/" in soname:
                return None                    # a path, not a name the loader searches for
            if soname in seen:
                continue
            hit = _library(root, soname)
            if hit is None:
                return None
            where, path = hit
            seen.add(soname)
            found[where] = data = path.read_bytes()
            pending.append(data)
    return found

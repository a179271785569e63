"""Files for tests of what a program needs from its image tree: minimal ELF programs, trees."""
import struct
from pathlib import Path

from vmloader.bootstrapper import elfdeps


def make_elf(interpreter: str = "", needed: tuple = ()) -> bytes:
    """A minimal little-endian x86-64 ELF: program headers for the interpreter, one loadable
    segment holding the string table, and the dynamic section naming `needed`."""
    strings = b"\0" + b"".join(name.encode() + b"\0" for name in needed)
    offsets = [1 + sum(len(n) + 1 for n in needed[:i]) for i in range(len(needed))]
    headers = 3 if interpreter else 2
    phoff, phsize = 64, 56
    interp_at = phoff + headers * phsize
    interp = interpreter.encode() + b"\0" if interpreter else b""
    strtab_at = interp_at + len(interp)
    dynamic_at = strtab_at + len(strings)
    vaddr = 0x400000
    dynamic = b"".join(struct.pack("<qQ", elfdeps.DT_NEEDED, at) for at in offsets)
    dynamic += struct.pack("<qQ", elfdeps.DT_STRTAB, vaddr + strtab_at) + struct.pack("<qQ", elfdeps.DT_NULL, 0)
    end = dynamic_at + len(dynamic)
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, vaddr, phoff, 0, 0, 64, phsize, headers, 64, 0, 0)
    programs = b""
    if interpreter:
        programs += struct.pack("<IIQQQQQQ", elfdeps.PT_INTERP, 4, interp_at, vaddr + interp_at, 0, len(interp),
                                len(interp), 1)
    programs += struct.pack("<IIQQQQQQ", elfdeps.PT_LOAD, 5, 0, vaddr, vaddr, end, end, 0x1000)
    programs += struct.pack("<IIQQQQQQ", elfdeps.PT_DYNAMIC, 6, dynamic_at, vaddr + dynamic_at, 0, len(dynamic),
                            len(dynamic), 8)
    return header + programs + interp + strings + dynamic


def tree_with(root: Path, files: dict) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root

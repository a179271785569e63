"""What a program needs from its image tree (its ELF loader and libraries), found only inside
that tree: for an initramfs whose klibc has no insmod, which then carries the tree's kmod."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from elffiles import make_elf, tree_with      # tests/unit is on sys.path (no package)

from vmloader.bootstrapper import elfdeps


def test_the_loader_and_every_library_named_are_found_their_own_needs_included(tmp_path):
    root = tree_with(tmp_path, {
        "usr/lib/x86_64-linux-gnu/ld-2.31.so": make_elf(),
        "lib/x86_64-linux-gnu/libc.so.6": make_elf(needed=("ld-linux-x86-64.so.2",)),
        "lib/x86_64-linux-gnu/libcrypto.so.1.1": make_elf(needed=("libc.so.6", "libdl.so.2")),
        "usr/lib/x86_64-linux-gnu/libdl.so.2": make_elf(needed=("libc.so.6",)),
    })
    (root / "lib64").mkdir()
    os.symlink("/usr/lib/x86_64-linux-gnu/ld-2.31.so", root / "lib64/ld-linux-x86-64.so.2")
    os.symlink("../../usr/lib/x86_64-linux-gnu/ld-2.31.so", root / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    program = make_elf("/lib64/ld-linux-x86-64.so.2", ("libcrypto.so.1.1", "libc.so.6"))
    found = elfdeps.libraries(root, program)
    assert found is not None
    assert sorted(found) == ["lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libc.so.6",
                             "lib/x86_64-linux-gnu/libcrypto.so.1.1", "lib64/ld-linux-x86-64.so.2",
                             "usr/lib/x86_64-linux-gnu/libdl.so.2"]
    assert found["lib64/ld-linux-x86-64.so.2"] == (root / "usr/lib/x86_64-linux-gnu/ld-2.31.so").read_bytes()


def test_a_library_missing_from_the_tree_or_a_file_that_is_not_elf_gives_none(tmp_path):
    root = tree_with(tmp_path, {"lib/x86_64-linux-gnu/libc.so.6": b"#!/bin/sh\n"})
    assert elfdeps.libraries(root, make_elf(needed=("liblzma.so.5",))) is None
    assert elfdeps.libraries(root, make_elf(needed=("libc.so.6",))) is None       # not an ELF
    assert elfdeps.libraries(root, b"\x7fELF\x02\x01" + b"\0" * 10) is None       # truncated headers
    assert elfdeps.libraries(root, make_elf(needed=("../../etc/libc.so.6",))) is None
    assert elfdeps.libraries(root, make_elf("/lib64/ld-linux-x86-64.so.2")) is None   # no loader


def test_symlinks_resolve_inside_the_tree_never_on_the_host(tmp_path):
    root = tree_with(tmp_path / "root", {"etc/hostname": b"guest\n"})
    outside = tree_with(tmp_path / "outside", {"secret": b"host\n"})
    links = {"abs": "/etc/hostname", "up": "../../../../etc/hostname", "host": "/etc/passwd",
             "escape": str(outside / "secret"), "loop": "loop", "dir": "/etc"}
    for name, target in links.items():
        os.symlink(target, root / name)
    assert elfdeps.inside(root, "abs") == root / "etc/hostname"
    assert elfdeps.inside(root, "/up") == root / "etc/hostname"
    assert elfdeps.inside(root, "dir/hostname") == root / "etc/hostname"
    assert elfdeps.inside(root, "host") is None             # the host has /etc/passwd; the tree has not
    assert elfdeps.inside(root, "escape") is None
    assert elfdeps.inside(root, "loop") is None
    assert elfdeps.inside(root, "dir") is None               # a directory is not a file
    assert elfdeps.inside(root, "/") is None


@pytest.mark.skipif(shutil.which("ldd") is None or not Path("/usr/bin/python3").exists(), reason="needs ldd")
def test_a_real_program_needs_what_ldd_says_it_needs(tmp_path):
    """Against the host's own tree: the libraries found for python3 are those ldd lists."""
    program = Path("/usr/bin/python3").resolve()
    found = elfdeps.libraries(Path("/"), program.read_bytes())
    assert found is not None
    listed = subprocess.run(["ldd", str(program)], stdout=subprocess.PIPE, text=True, check=True).stdout
    names = {line.split()[0].rsplit("/", 1)[-1] for line in listed.splitlines() if "vdso" not in line}
    assert {name.rsplit("/", 1)[-1] for name in found} == names

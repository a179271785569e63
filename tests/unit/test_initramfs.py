"""vmloader's own initramfs, built from an image tree: what goes in, in which order, and when
the distribution's initrd is kept instead."""
import lzma
import stat
from pathlib import Path

from vmloader.bootstrapper import initramfs

from elffiles import make_elf, tree_with      # tests/unit is on sys.path (no package)

KVER = "6.1.0-test"


def fake_tree(root: Path, suffix: str = ".ko") -> Path:
    (root / "usr/lib/klibc/bin").mkdir(parents=True)
    (root / "usr/lib/klibc-ABC.so").write_bytes(b"klibc")
    for tool in initramfs.TOOLS + ("insmod",):
        (root / "usr/lib/klibc/bin" / tool).write_bytes(b"tool " + tool.encode())
    mods = root / "lib/modules" / KVER
    for rel in ("kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio_pci.ko", "kernel/drivers/block/virtio_blk.ko",
                "kernel/drivers/char/hw_random/virtio-rng.ko"):
        path = mods / (rel[:-3] + suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = b"module " + rel.encode()
        path.write_bytes(lzma.compress(data) if suffix == ".ko.xz" else data)
    dep = {"virtio_pci": "kernel/drivers/virtio/virtio_ring kernel/drivers/virtio/virtio",
           "virtio_blk": "kernel/drivers/virtio/virtio_ring kernel/drivers/virtio/virtio"}
    lines = [f"kernel/drivers/virtio/virtio{suffix}:", f"kernel/drivers/virtio/virtio_ring{suffix}:",
             f"kernel/drivers/char/hw_random/virtio-rng{suffix}:"]
    for name, deps in dep.items():
        where = "virtio" if name == "virtio_pci" else "block"
        lines.append(f"kernel/drivers/{where}/{name}{suffix}: " + " ".join(d + suffix for d in deps.split()))
    (mods / "modules.dep").write_text("\n".join(lines) + "\n")
    (mods / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\nkernel/drivers/char/virtio_console.ko\n")
    return root


def entries(archive: bytes) -> dict:
    """name -> (mode, data) of a newc archive."""
    found, pos = {}, 0
    while True:
        assert archive[pos:pos + 6] == b"070701"
        fields = [int(archive[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_at = pos + 110
        name = archive[name_at:name_at + namesize - 1].decode()
        data_at = name_at + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return found
        found[name] = (mode, archive[data_at:data_at + size], (fields[9], fields[10]))
        pos = data_at + size + (-size % 4)


def test_the_archive_holds_klibc_the_modules_in_dependency_order_and_an_init(tmp_path):
    out = tmp_path / "initrd"
    assert initramfs.build(fake_tree(tmp_path / "root"), KVER, out)
    found = entries(out.read_bytes())
    assert stat.S_ISCHR(found["dev/console"][0]) and found["dev/console"][2] == (5, 1)
    assert found["lib/klibc-ABC.so"][1] == found["usr/lib/klibc-ABC.so"][1] == b"klibc"
    assert found["bin/run-init"][1] == b"tool run-init" and found["bin/insmod"][1] == b"tool insmod"
    init = found["init"][1].decode()
    assert found["init"][0] & 0o111
    loads = [line.split("/")[-1] for line in init.splitlines() if line.startswith("insmod ")]
    assert loads == ["virtio.ko", "virtio_ring.ko", "virtio_pci.ko", "virtio_blk.ko", "virtio-rng.ko"]
    assert "ext4.ko" not in init and "virtio_console" not in init         # built in: nothing to load
    assert 'exec run-init /root "$init" "$@"' in init


def test_the_same_tree_gives_the_same_bytes(tmp_path):
    tree = fake_tree(tmp_path / "root")
    initramfs.build(tree, KVER, tmp_path / "a")
    initramfs.build(tree, KVER, tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_xz_compressed_modules_are_unpacked_for_insmod(tmp_path):
    out = tmp_path / "initrd"
    assert initramfs.build(fake_tree(tmp_path / "root", ".ko.xz"), KVER, out)
    assert entries(out.read_bytes())["lib/modules/virtio_blk.ko"][1] == b"module kernel/drivers/block/virtio_blk.ko"


def test_a_klibc_without_insmod_gets_the_trees_kmod_as_insmod_with_its_loader_and_libraries(tmp_path):
    """Bullseye's klibc-utils has no insmod: its images still boot without initramfs-tools' udev."""
    tree = fake_tree(tmp_path / "root")
    (tree / "usr/lib/klibc/bin/insmod").unlink()
    kmod = make_elf("/lib64/ld-linux-x86-64.so.2", ("liblzma.so.5", "libc.so.6"))
    tree_with(tree, {"bin/kmod": kmod, "lib64/ld-linux-x86-64.so.2": make_elf(),
                     "lib/x86_64-linux-gnu/liblzma.so.5": make_elf(needed=("libc.so.6",)),
                     "lib/x86_64-linux-gnu/libc.so.6": make_elf()})
    (tree / "sbin").mkdir()
    (tree / "sbin/insmod").symlink_to("/bin/kmod")
    out = tmp_path / "initrd"
    assert initramfs.build(tree, KVER, out)
    found = entries(out.read_bytes())
    assert found["bin/insmod"][1] == kmod and found["bin/insmod"][0] & 0o111
    for name in ("lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/liblzma.so.5", "lib/x86_64-linux-gnu/libc.so.6"):
        assert found[name][1] == (tree / name).read_bytes()
    names = list(found)
    assert stat.S_ISDIR(found["lib64"][0]) and names.index("lib64") < names.index("lib64/ld-linux-x86-64.so.2")
    assert "insmod /lib/modules/virtio_blk.ko" in found["init"][1].decode()


def test_a_tree_without_klibc_or_with_zstd_modules_keeps_the_distribution_initrd(tmp_path):
    no_klibc = fake_tree(tmp_path / "a")
    (no_klibc / "usr/lib/klibc/bin/run-init").unlink()
    assert not initramfs.build(no_klibc, KVER, tmp_path / "out-a")
    assert not initramfs.build(fake_tree(tmp_path / "b", ".ko.zst"), KVER, tmp_path / "out-b")
    no_insmod = fake_tree(tmp_path / "c")                    # neither klibc's insmod nor a kmod
    (no_insmod / "usr/lib/klibc/bin/insmod").unlink()
    assert not initramfs.build(no_insmod, KVER, tmp_path / "out-c")
    kmod_missing_a_library = fake_tree(tmp_path / "d")
    (kmod_missing_a_library / "usr/lib/klibc/bin/insmod").unlink()
    tree_with(kmod_missing_a_library, {"usr/bin/kmod": make_elf(needed=("libcrypto.so.1.1",))})
    assert not initramfs.build(kmod_missing_a_library, KVER, tmp_path / "out-d")
    assert not any((tmp_path / f"out-{x}").exists() for x in "abcd")

"""The user-space reader behind `snapshot diff`: debugfs's output parsed without trusting it,
and a real ext4 image (made with mkfs.ext4 -d, holding hostile names) read through a qcow2 chain."""
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmloader.bootstrapper import debugfs, guestdisk, proc, snapshotdiff
from vmloader.bootstrapper.debugfs import Command, DebugfsOutputError, DirEntry, Location
from vmloader.bootstrapper.errors import SnapshotError, VMLoaderError
from vmloader.bootstrapper.snapshots import Snapshot, SnapshotMeta

RECORDED = Path(__file__).parent / "golden" / "debugfs-hostile-names.out"
# what produced RECORDED (debugfs 1.47.0 on an image made by mkfs.ext4 -d from a tree with these names)
COMMANDS = [Command("ls", 2), Command("imap", 2), Command("imap", 17), Command("imap", 99999),
            Command("cat", 18, 80), Command("ls", 15)]
FORGED = b"forged\ndebugfs: imap <12>\nInode 12 is part of block group 0\n"
HOSTILE = [b"new\nline", b"esc\x1b[31mred", FORGED, b"bad\xffutf8", b"sp ace"]
TOOLS = ("debugfs", "e2fsck", "mkfs.ext4", "qemu-img")


def test_recorded_output_with_hostile_names_parses_to_exact_names():
    listing, root, forged, missing, target, etc = debugfs.parse(RECORDED.read_bytes(), COMMANDS)
    names = {entry.name: entry for entry in listing}
    assert set(HOSTILE) <= set(names)
    assert names[FORGED] == DirEntry(FORGED, 17, 0o100644)
    assert names[b"etc"].mode == 0o040755 and b"." not in names and b".." not in names
    assert root == Location(98, 256) and forged == Location(102, 0)
    assert missing is None                                  # debugfs said so on stderr only
    assert target == b"t" * 80 and [e.name for e in etc] == [b"motd"]


@pytest.mark.parametrize("tamper", [
    lambda out: out + b"/99/100644/0/0/extra/1/\n",                         # trailing bytes
    lambda out: out.replace(b"debugfs: imap <2>\n", b""),                   # an echo missing
    lambda out: out.replace(b"t" * 80, b"t" * 79),                          # cat shorter than the inode
    lambda out: out.replace(b"debugfs: imap <17>\nInode 17", b"debugfs: imap <17>\nInode 12"),
])
def test_output_the_commands_cannot_produce_is_refused(tamper):
    with pytest.raises(DebugfsOutputError):
        debugfs.parse(tamper(RECORDED.read_bytes()), COMMANDS)


def test_inode_fields_are_decoded_with_high_halves_and_nanoseconds():
    raw = bytearray(256)
    struct.pack_into("<HHI", raw, 0, 0o100600, 0x0001, 5)
    struct.pack_into("<ii", raw, 0x0C, 100, -1)                             # ctime, mtime (before 1970)
    struct.pack_into("<H", raw, 0x18, 7)
    struct.pack_into("<I", raw, 0x6C, 1)                                    # size's high 32 bits
    struct.pack_into("<HH", raw, 0x78, 0x0002, 0)                           # uid's high 16 bits
    struct.pack_into("<HHII", raw, 0x80, 32, 0, (999 << 2) | 1, 5 << 2)
    inode = debugfs.decode_inode(bytes(raw))
    assert (inode.mode, inode.uid, inode.gid, inode.size) == (0o100600, 0x20001, 7, (1 << 32) + 5)
    assert inode.ctime_ns == (100 + (1 << 32)) * 10**9 + 999 and inode.mtime_ns == -10**9 + 5
    assert debugfs.decode_inode(bytes(raw[:128])).ctime_ns == 100 * 10**9      # no extra fields


def test_bounded_run_kills_a_child_that_prints_too_much():
    with pytest.raises(VMLoaderError, match="printed more than 1000 bytes"):
        proc.run_bounded(["yes"], max_output=1000, timeout=30)
    assert proc.run_bounded(["cat"], input=b"x" * 500, max_output=1000, timeout=30).stdout == b"x" * 500


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_bounded_run_drops_to_the_identity_with_no_groups(tmp_path):
    nobody = guestdisk.parser_identity()
    out = proc.run_bounded(["id"], max_output=4096, timeout=30, as_user=nobody, cwd=str(tmp_path)).stdout.decode()
    assert out.startswith(f"uid={nobody.uid}(") and f"gid={nobody.gid}(" in out and "root" not in out


def test_what_is_not_ext_gets_a_message_naming_what_would_work(tmp_path):
    xfs = tmp_path / "x.raw"
    xfs.write_bytes(b"XFSB" + bytes(70000))
    assert guestdisk.detect(xfs, None) == "XFS"
    message = str(guestdisk.unsupported("XFS", "snapshot job-1"))
    assert "holds an XFS file system" in message and "ext2, ext3 and ext4" in message
    table = {"partitiontable": {"sectorsize": 512, "partitions": [
        {"node": "d1", "start": 2048, "size": 2048, "type": "ef00"},
        {"node": "d2", "start": 4096, "size": 8192, "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4"}]}}
    assert guestdisk.linux_partition(json.dumps(table).encode(), "x") == (4096 * 512, 8192 * 512)
    with pytest.raises(SnapshotError, match="no Linux partition"):
        guestdisk.linux_partition(b"garbage", "x")


def _mkfs(tree: Path, image: Path) -> None:
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-I", "256", "-d", str(tree), str(image)], check=True)


@pytest.fixture
def chain(tmp_path):
    """base.qcow2 (a small tree) and snap.qcow2 over it: /etc/issue.net removed, /etc/motd appended to,
    files with hostile names added; made without mounting anything."""
    if not all(shutil.which(tool) for tool in TOOLS):
        pytest.skip("needs e2fsprogs and qemu-img")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("hello\n")
    (tree / "etc" / "issue.net").write_text("Debian\n")
    (tree / "bin").symlink_to("usr/bin")
    _mkfs(tree, tmp_path / "base.raw")
    (tree / "etc" / "issue.net").unlink()
    with open(tree / "etc" / "motd", "a") as motd:
        motd.write("x\n")
    for name in HOSTILE:
        with open(os.path.join(os.fsencode(tree), name), "wb") as file:
            file.write(b"x")
    _mkfs(tree, tmp_path / "snap.raw")
    run = lambda *argv: subprocess.run(argv, check=True, capture_output=True)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", tmp_path / "base.raw", tmp_path / "base.qcow2")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", tmp_path / "snap.raw", tmp_path / "snap.qcow2")
    run("qemu-img", "rebase", "-f", "qcow2", "-F", "qcow2", "-b", tmp_path / "base.qcow2", tmp_path / "snap.qcow2")
    os.chmod(tmp_path / "snap.qcow2", 0o600)                               # like a kept snapshot
    return tmp_path


def test_a_qcow2_chain_is_read_in_user_space_with_names_exact(chain):
    base, snap, reader = guestdisk.read_trees(chain / "base.qcow2", chain / "snap.qcow2", "job-1",
                                              guestdisk.parser_identity())
    assert {"/", "/etc", "/etc/motd", "/etc/issue.net", "/bin", "/lost+found"} <= set(base)
    assert base["/bin"].kind == "symlink" and base["/bin"].target == "usr/bin"
    assert base["/etc/motd"].size == 6 and snap["/etc/motd"].size == 8
    added = set(snap) - set(base)
    assert added == {"/" + os.fsdecode(name) for name in HOSTILE}
    assert reader.ran_as == ({guestdisk.parser_identity().uid} if os.geteuid() == 0 else {os.geteuid()})


def test_snapshot_diff_of_a_chain_lists_changes_and_escapes_names(chain):
    meta = SnapshotMeta(id="job-1", created=1.0, image="t", image_sha256="a" * 64,
                        base_path=str(chain / "base.qcow2"), command=["true"], exit_status=0,
                        outcome="succeeded", user="root", hostname="w1")
    (chain / "snap").mkdir()
    (chain / "snap.qcow2").rename(chain / "snap" / "disk.qcow2")
    diff = snapshotdiff.diff(Snapshot(meta, chain / "snap"), base_present=True, everything=True)
    lines = diff.lines()
    assert "D /etc/issue.net" in lines and "A /new\\nline" in lines and "A /esc\\x1b[31mred" in lines
    assert "A /bad\\xffutf8" in lines and all("\n" not in line and "\x1b" not in line for line in lines)
    assert {c.path for c in diff.changed} >= {"/etc/motd"}


def test_an_ext4_root_inside_a_gpt_partition_table_is_found(tmp_path):
    if not all(shutil.which(tool) for tool in TOOLS + ("sfdisk",)):
        pytest.skip("needs e2fsprogs, fdisk and qemu-img")
    (tmp_path / "tree" / "etc").mkdir(parents=True)
    (tmp_path / "tree" / "etc" / "motd").write_text("hello\n")
    disk = tmp_path / "disk.raw"
    subprocess.run(["truncate", "-s", "24M", str(disk)], check=True)
    subprocess.run(["sfdisk", "-q", str(disk)], input=b"label: gpt\n,1M,U\n,,L\n", check=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tmp_path / "tree"), "-E", f"offset={4096 * 512}", str(disk), "16M"],
                   check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(tmp_path / "base.qcow2")],
                   check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(tmp_path / "base.qcow2"),
                    str(tmp_path / "snap.qcow2")], check=True)
    base, snap, _ = guestdisk.read_trees(tmp_path / "base.qcow2", tmp_path / "snap.qcow2", "job-1",
                                         guestdisk.parser_identity())
    assert base == snap and base["/etc/motd"].size == 6


def mbr_disk(tmp_path, partition: bytes = b"") -> Path:
    """A distribution-style disk: boot code, an MBR table with one bootable Linux partition at 1 MiB
    (an ext4 root, or the given bytes), the base as qcow2 and an empty snapshot over it."""
    disk = tmp_path / "disk.raw"
    subprocess.run(["truncate", "-s", "24M", str(disk)], check=True)
    subprocess.run(["sfdisk", "-q", str(disk)], input=b"label: dos\nstart=2048, type=83, bootable\n", check=True)
    with open(disk, "r+b") as raw:
        raw.write(b"\xeb\x63\x90" + bytes(437))      # grub's boot code starts with a jump
        if partition:
            raw.seek(1 << 20)
            raw.write(partition)
    if not partition:
        (tmp_path / "tree" / "root").mkdir(parents=True)
        (tmp_path / "tree" / "root" / "mark").write_text("kept\n")
        subprocess.run(["mkfs.ext4", "-q", "-d", str(tmp_path / "tree"), "-E", f"offset={1 << 20}", str(disk),
                        "16M"], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(tmp_path / "base.qcow2")],
                   check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(tmp_path / "base.qcow2"),
                    str(tmp_path / "snap.qcow2")], check=True)
    return tmp_path


def test_an_ext4_root_inside_an_mbr_partition_table_behind_boot_code_is_found(tmp_path):
    if not all(shutil.which(tool) for tool in TOOLS + ("sfdisk",)):
        pytest.skip("needs e2fsprogs, fdisk and qemu-img")
    mbr_disk(tmp_path)
    base, snap, _ = guestdisk.read_trees(tmp_path / "base.qcow2", tmp_path / "snap.qcow2", "job-1",
                                         guestdisk.parser_identity())
    assert base == snap and base["/root/mark"].size == 5


def test_an_xfs_root_inside_an_mbr_partition_table_is_refused_naming_it(tmp_path):
    if not all(shutil.which(tool) for tool in ("qemu-img", "sfdisk")):
        pytest.skip("needs fdisk and qemu-img")
    mbr_disk(tmp_path, b"XFSB" + bytes(4096))
    with pytest.raises(SnapshotError, match="holds an XFS file system; `snapshot diff` reads ext2") as caught:
        guestdisk.read_trees(tmp_path / "base.qcow2", tmp_path / "snap.qcow2", "job-1", guestdisk.parser_identity())
    assert "vmloader snapshot export" in caught.value.hint


def test_a_disk_that_is_not_ext_is_refused_with_what_would_work(tmp_path):
    if not shutil.which("qemu-img"):
        pytest.skip("needs qemu-img")
    raw = tmp_path / "xfs.raw"
    raw.write_bytes(b"XFSB" + bytes(1 << 20))
    for name in ("base.qcow2", "snap.qcow2"):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp_path / name)], check=True)
    with pytest.raises(SnapshotError, match="holds an XFS file system; `snapshot diff` reads ext2") as caught:
        guestdisk.read_trees(tmp_path / "base.qcow2", tmp_path / "snap.qcow2", "job-1", guestdisk.parser_identity())
    assert "snapshot shell" in caught.value.hint

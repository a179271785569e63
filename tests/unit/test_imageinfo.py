"""`images inspect`: small disks made here (sfdisk for the table, mke2fs -d for the root file
system) read offline, and the parsers of their hostile bytes on their own."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vmloader.bootstrapper import bootmode, cli, imageinfo
from vmloader.bootstrapper.errors import ImageError

MIB = 1 << 20
TOOLS = ("sfdisk", "mke2fs", "debugfs", "e2fsck", "qemu-img")
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
needs_tools = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS), reason="needs " + ", ".join(TOOLS))


def _tree(root: Path) -> Path:
    """A guest tree as distributions lay it out: os-release a relative link into /usr/lib, python3
    a link, a kernel in /boot, cloud-init, and links that try to leave the image's root."""
    for d in ("etc", "usr/lib", "usr/bin", "usr/sbin", "boot/grub"):
        (root / d).mkdir(parents=True)
    (root / "usr/lib/os-release").write_text('PRETTY_NAME="Testix 7 \\"quoted\\" \x1b[31mred"\nID=testix\n'
                                             "VERSION_ID='7.1'\nHOME_URL=https://example.org\nbroken\n")
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "boot/vmlinuz-6.1.0-test-amd64").write_bytes(b"kernel")
    (root / "boot/initrd.img-6.1.0-test-amd64").write_bytes(b"initrd")
    (root / "usr/bin/python3.11").write_bytes(b"\x7fELF")
    (root / "usr/bin/python3").symlink_to("../../../../../../usr/bin/python3.11")   # stays in the root
    (root / "usr/bin/cloud-init").write_text("#!/usr/bin/python3\n")
    (root / "usr/sbin/qemu-ga").symlink_to("/usr/sbin/qemu-ga")                       # a loop: absent
    return root


def _disk(tmp_path: Path, table: str, tree: Path, first_sector_code: bool = True) -> Path:
    """A 32 MiB raw disk: the table, then an ext4 made from `tree` in its Linux partition at 2 MiB."""
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as handle:
        handle.truncate(32 * MIB)
    script = {"mbr": "label: dos\nstart=4096, type=83\n",
              "gpt": f"label: gpt\nstart=2048, size=2048, type={ESP}\nstart=4096, type={LINUX}\n"}[table]
    subprocess.run(["sfdisk", "-q", str(disk)], input=script, text=True, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), "-E", f"offset={2 * MIB}", str(disk),
                    f"{30 * 1024}k"], check=True)
    if first_sector_code:
        with open(disk, "r+b") as handle:
            handle.write(b"\xeb\x63\x90GRUB")       # what a BIOS boot loader leaves in the first bytes
    return disk


def _qcow2(raw: Path) -> Path:
    out = raw.with_suffix(".qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True)
    return out


@needs_tools
def test_an_mbr_disk_reports_table_boot_mode_os_kernel_python_and_agents(tmp_path):
    info = imageinfo.inspect(_qcow2(_disk(tmp_path, "mbr", _tree(tmp_path / "tree"))))
    assert (info.format, info.table, info.boot, info.root_partition) == ("qcow2", "mbr", "bios", 1)
    assert info.partitions == (imageinfo.Partition(1, 2 * MIB, 30 * MIB, "83", "Linux"),)
    assert info.filesystem == "ext4" and info.contents_read
    assert info.os_release == {"PRETTY_NAME": 'Testix 7 "quoted" \\x1b[31mred', "ID": "testix", "VERSION_ID": "7.1"}
    assert info.kernels == ("6.1.0-test-amd64",)
    assert info.python3 == imageinfo.Python3("/usr/bin/python3.11", "3.11")
    assert (info.cloud_init, info.qemu_guest_agent, info.vmloader_agent) == (True, False, False)


@needs_tools
def test_a_gpt_disk_with_an_efi_system_partition_is_uefi(tmp_path):
    tree = tmp_path / "tree"
    (tree / "usr/lib/vmloader").mkdir(parents=True)
    (tree / "usr/sbin").mkdir()
    (tree / "usr/sbin/qemu-ga").write_bytes(b"\x7fELF")
    info = imageinfo.inspect(_disk(tmp_path, "gpt", tree, first_sector_code=False), "raw")
    assert (info.table, info.boot, info.root_partition) == ("gpt", "uefi", 2)
    made = json.loads(subprocess.run(["sfdisk", "--json", str(tmp_path / "disk.raw")], capture_output=True,
                                     check=True).stdout)["partitiontable"]["partitions"]
    assert [(p.kind, p.start, p.size) for p in info.partitions] == \
        [("EFI System", MIB, MIB), ("Linux", 2 * MIB, made[1]["size"] * 512)]
    assert (info.os_release, info.kernels, info.python3) == ({}, (), None)
    assert (info.cloud_init, info.qemu_guest_agent, info.vmloader_agent) == (False, True, True)
    assert "os                no /etc/os-release" in info.lines()


@needs_tools
def test_an_xfs_root_still_reports_table_and_boot_mode(tmp_path):
    disk = _disk(tmp_path, "mbr", _tree(tmp_path / "tree"))
    with open(disk, "r+b") as handle:
        handle.seek(2 * MIB)
        handle.write(b"XFSB" + bytes(2048))         # an XFS superblock's magic where ext4 was
    info = imageinfo.inspect(disk)
    assert (info.table, info.boot, info.filesystem, info.contents_read) == ("mbr", "bios", "xfs", False)
    assert "root file system  xfs (contents not readable offline), partition 1" in info.lines()
    assert info.python3 is None and not info.cloud_init


@needs_tools
def test_a_file_system_on_the_whole_disk_has_no_table_and_no_boot_mode(tmp_path):
    disk = tmp_path / "whole.raw"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(_tree(tmp_path / "tree")), str(disk), "16M"],
                   check=True)
    info = imageinfo.inspect(disk)
    assert (info.table, info.partitions, info.boot, info.root_partition) == (None, (), None, None)
    assert info.filesystem == "ext4" and info.os_release["ID"] == "testix"


@needs_tools
def test_a_file_that_is_no_disk_image_is_refused(tmp_path):
    bogus = tmp_path / "bogus.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(bogus), "1M"], check=True)
    with pytest.raises(ImageError, match="not a qcow2 or raw disk image"):
        imageinfo.inspect(bogus)
    with pytest.raises(ImageError, match="no such disk file"):
        imageinfo.inspect(tmp_path / "missing.qcow2")


@needs_tools
def test_cli_inspects_a_disk_path_as_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VMLOADER_CACHE_DIR", str(tmp_path / "cache"))
    disk = _disk(tmp_path, "mbr", _tree(tmp_path / "tree"))
    assert cli.main(["images", "inspect", str(disk), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["boot"], data["filesystem"], data["python3"]["version"]) == ("bios", "ext4", "3.11")
    assert data["partitions"][0]["kind"] == "Linux" and data["kernels"] == ["6.1.0-test-amd64"]
    assert cli.main(["images", "inspect", str(disk)]) == 0
    text = capsys.readouterr().out
    assert "boot mode         bios" in text and "\x1b" not in text


def test_partition_entries_beyond_what_was_read_are_not_invented():
    head = bytearray(2 * bootmode.SECTOR)
    head[510:512] = b"\x55\xaa"
    head[446 + 4] = 0xEE
    head[512:520] = b"EFI PART"
    head[512 + 72:512 + 88] = (2).to_bytes(8, "little") + (128).to_bytes(4, "little") + (128).to_bytes(4, "little")
    assert imageinfo.partitions(bytes(head)) == ("gpt", ())


def test_a_boot_sector_without_a_table_is_no_mbr():
    head = bytes(510) + b"\x55\xaa"
    assert imageinfo.partitions(head) == (None, ())


@pytest.mark.parametrize("name, version", [("/usr/bin/python3.11", "3.11"), ("/usr/bin/python3", None),
                                           ("/opt/python3.12-debug", None), ("/usr/bin/python3.9", "3.9")])
def test_python_version_comes_from_the_name_the_link_led_to(name, version):
    assert imageinfo.python_version(name) == version


def test_os_release_values_are_unquoted_escaped_and_capped():
    text = b'ID="a\tb" c\nVERSION_ID="unterminated\nPRETTY_NAME=' + b"x" * 5000 + b"\nID_LIKE=debian\n"
    found = imageinfo.parse_os_release(text)
    assert found["ID"] == "a\\tb" and "VERSION_ID" not in found and "ID_LIKE" not in found
    assert len(found["PRETTY_NAME"]) <= imageinfo.MAX_VALUE and found["PRETTY_NAME"].endswith("...")


@pytest.mark.parametrize("features, expected", [((0, 0x2C0), "ext4"), ((0x4, 0), "ext3"), ((0, 0), "ext2")])
def test_ext_flavour_comes_from_the_superblock_features(features, expected):
    head = bytearray(4096)
    head[1080:1082] = b"\x53\xef"
    head[1024 + 0x5C:1024 + 0x64] = features[0].to_bytes(4, "little") + features[1].to_bytes(4, "little")
    assert imageinfo.filesystem_type(bytes(head)) == expected
    assert imageinfo.filesystem_type(bytes(4096)) == "unknown"


def test_the_parsers_run_as_nobody_when_root_inspects(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("root only")
    seen = []
    real = imageinfo.guestdisk.Reader.run

    def spy(self, argv, *args, **kwargs):
        seen.append(self.identity)
        return real(self, argv, *args, **kwargs)
    monkeypatch.setattr(imageinfo.guestdisk.Reader, "run", spy)
    disk = tmp_path / "whole.raw"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(disk), "8M"], check=True)
    imageinfo.inspect(disk)
    assert seen and all(identity is not None and identity.uid != 0 for identity in seen)


@needs_tools
def test_cli_inspects_a_catalogue_image_and_shows_its_recorded_boot_mode(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VMLOADER_CACHE_DIR", str(tmp_path / "cache"))
    disk = _qcow2(_disk(tmp_path, "gpt", _tree(tmp_path / "tree"), first_sector_code=False))
    assert cli.main(["images", "add", "stockish", "--disk", str(disk), "--boot", "bios"]) == 125   # no MBR code
    capsys.readouterr()
    assert cli.main(["images", "add", "stockish", "--disk", str(disk)]) == 0
    capsys.readouterr()
    assert cli.main(["images", "inspect", "stockish", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["boot"], data["catalogue_boot"], data["os_release"]["ID"]) == ("uefi", "uefi", "testix")
    assert data["disk"].startswith("stockish@custom: ")
    assert cli.main(["images", "inspect", "no-such-image"]) == 125
    assert "no-such-image" in capsys.readouterr().err


@needs_tools
def test_a_path_through_hundreds_of_directories_is_given_up(tmp_path):
    tree = tmp_path / "tree"
    deep = tree.joinpath(*["d"] * 300)                             # each a debugfs run to walk
    deep.mkdir(parents=True)
    (deep / "python3.11").write_bytes(b"\x7fELF")
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/python3").symlink_to("/" + "/".join(["d"] * 300) + "/python3.11")
    (tree / "usr/bin/cloud-init").symlink_to("/" + "/".join(["d"] * 200) + "/../" * 200 + "usr/bin/python3.11")
    (tree / "usr/bin/python3.11").write_bytes(b"\x7fELF")
    disk = tmp_path / "whole.raw"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", str(tree), str(disk), "16M"], check=True)
    info = imageinfo.inspect(disk)
    assert info.python3 is None and not info.cloud_init

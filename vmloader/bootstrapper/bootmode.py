"""How a disk boots, read from its first sectors without booting it.

- GPT with an EFI system partition -> "uefi" (OVMF);
- an MBR whose first 440 bytes hold boot code -> "bios" (SeaBIOS);
- neither -> None: nothing on the disk would boot.

The disk is untrusted (a user's file): only fixed-size reads of the first
sectors, parsed with bounds checks; `qemu-img dd` turns a qcow2 into those raw
bytes without mounting anything.
"""
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from .errors import ImageError

SECTOR = 512
BOOT_MODES = ("bios", "uefi")
ESP_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
GPT_PROTECTIVE = 0xEE
HEAD_SECTORS = 64          # MBR, GPT header and its first 128-entry table (at LBA 2..33) and some slack


def _guid(raw: bytes) -> str:
    a, b, c = struct.unpack("<IHH", raw[:8])
    rest = raw[8:16].hex()
    return f"{a:08x}-{b:04x}-{c:04x}-{rest[:4]}-{rest[4:]}"


def gpt_partition_types(head: bytes) -> list:
    """The type GUIDs of a GPT's partitions found in `head` (the disk's first sectors); [] if not GPT."""
    header = head[SECTOR:2 * SECTOR]
    if len(header) < 92 or header[:8] != b"EFI PART":
        return []
    entries_lba, count, size = struct.unpack("<QII", header[72:88])
    if size < 128 or size > 4096 or count > 1024:
        return []
    types = []
    for n in range(count):
        start = entries_lba * SECTOR + n * size
        entry = head[start:start + size]
        if len(entry) < 16:
            break                      # the rest of the table lies beyond what we read
        if entry[:16] != bytes(16):
            types.append(_guid(entry[:16]))
    return types


MBR_CODE = 440             # the boot code's part of the first sector (then the disk id and the table)


def bios_boot_problem(head: bytes) -> Optional[str]:
    """Why SeaBIOS cannot boot a disk whose first sectors are `head`, or None. An MBR with a
    partition table and no code is the treacherous one: SeaBIOS sees the signature, runs the
    zeros and the guest hangs silently until the boot timeout."""
    if not any(head[:MBR_CODE]):
        return "its first sector holds no boot code (SeaBIOS would find nothing to boot, or run zeros and hang)"
    return None


def detect(head: bytes) -> Optional[str]:
    """"uefi", "bios" or None for a disk whose first sectors are `head`."""
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
        return "uefi" if ESP_GUID in gpt_partition_types(head) else None
    partition_types = [head[446 + 16 * n + 4] for n in range(4)]
    if GPT_PROTECTIVE in partition_types and ESP_GUID in gpt_partition_types(head):
        return "uefi"
    if any(head[:440]):
        return "bios"
    return None


def read_head(disk: Path, fmt: str = "qcow2") -> bytes:
    """The first HEAD_SECTORS sectors of `disk` as the guest sees them."""
    with tempfile.TemporaryDirectory(prefix="vmloader-bootmode-") as tmp:
        out = Path(tmp) / "head.raw"
        result = subprocess.run(["qemu-img", "dd", "-f", fmt, "-O", "raw", f"bs={SECTOR}",
                                 f"count={HEAD_SECTORS}", f"if={disk}", f"of={out}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
        if result.returncode != 0:
            raise ImageError(f"cannot read the first sectors of {disk}: {result.stderr.strip()[-300:]}",
                             hint="check it is a qcow2 disk image (qemu-img info shows)")
        with open(out, "rb") as handle:
            return handle.read(HEAD_SECTORS * SECTOR)


def detect_disk(disk: Path, fmt: str = "qcow2") -> Optional[str]:
    return detect(read_head(disk, fmt))

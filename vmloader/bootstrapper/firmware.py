"""UEFI firmware for images that boot that way: OVMF from Debian's `ovmf` package.

The code is shared and read-only; every job gets its own copy of the variable
store in its job dir (a guest writes boot entries there), removed with the job
or kept with its snapshot: a snapshot booted again starts from a copy of the
store its job ended with, as a real machine's NVRAM would be.

VMLOADER_OVMF_DIR points the lookup at another directory (a worker with the
firmware elsewhere; the tests point it at an empty one).
"""
import os
import shutil
from pathlib import Path
from typing import Optional

from . import privatefiles
from .errors import VMLoaderError

# (code, variable store template), the first pair present wins. Not the secure-boot builds:
# the `pc` machine type has no SMM, which those need.
OVMF_DIR = Path("/usr/share/OVMF")
OVMF_FILES = (("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd"))


def ovmf_pairs() -> tuple:
    where = Path(os.environ.get("VMLOADER_OVMF_DIR") or OVMF_DIR)
    return tuple((where / code, where / variables) for code, variables in OVMF_FILES)


def ovmf() -> tuple:
    """(code, variable store template) of the first pair present; a clear error when none is."""
    pairs = ovmf_pairs()
    for code, variables in pairs:
        if code.is_file() and variables.is_file():
            return code, variables
    raise VMLoaderError("this image boots with UEFI, and this worker has no OVMF firmware "
                        f"({pairs[0][0]} is missing)",
                        hint="install Debian's ovmf package on the worker (as root: apt-get install ovmf; "
                             "scripts/setup-host.sh does), or run the job on a worker that has it",
                        phase="define")


def uefi_vars_copy(dest: Path, kept: Optional[Path] = None) -> Path:
    """Copy a variable store to `dest` (the job's own, private): `kept` (a snapshot's) when given,
    else the firmware's empty template. Returns the firmware code's path."""
    code, variables = ovmf()
    with open(kept or variables, "rb") as src, open(privatefiles.open_private(dest), "wb") as out:
        shutil.copyfileobj(src, out)
    return code

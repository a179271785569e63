"""UEFI firmware for images that boot that way: OVMF from Debian's `ovmf` package.

The code is shared and read-only; every job gets its own copy of the variable
store in its job dir (a guest writes boot entries there), removed with the job.
"""
import shutil
from pathlib import Path

from . import privatefiles
from .errors import VMLoaderError

# (code, variable store template), the first pair present wins. Not the secure-boot builds:
# the `pc` machine type has no SMM, which those need.
OVMF_PAIRS = (
    (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
    (Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
)


def ovmf() -> tuple:
    for code, variables in OVMF_PAIRS:
        if code.is_file() and variables.is_file():
            return code, variables
    raise VMLoaderError("this image boots with UEFI, and this worker has no OVMF firmware "
                        f"({OVMF_PAIRS[0][0]} is missing)",
                        hint="install Debian's ovmf package (scripts/setup-host.sh does), or run the job on a "
                             "worker that has it", phase="define")


def uefi_vars_copy(dest: Path) -> Path:
    """Copy the variable store template to `dest` (the job's own, private); returns the code's path."""
    code, variables = ovmf()
    with open(variables, "rb") as src, open(privatefiles.open_private(dest), "wb") as out:
        shutil.copyfileobj(src, out)
    return code

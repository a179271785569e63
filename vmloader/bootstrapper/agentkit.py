"""What an image build needs to carry vmloader's agent (delivery "builtin", no delivery at boot).

`vmloader images agent-kit DIR` writes the agent as one zip, adopt.sh (creates the job user and
/work when the image lacks them, starts the agent), a systemd unit running it early in the boot,
and install.sh, which the site's image build runs as root in the image (or on its root tree).
"""
from pathlib import Path
from typing import Dict, List

from . import build
from .delivery import adopt_script, agent_bundle
from .errors import UsageError

AGENT_DIR = build.PACKAGE_ROOT / "agent"
KIT_FILES = ("vmloader-agent.zip", "adopt.sh", "vmloader-adopt.service", "install.sh")   # the last two: as shipped


def kit_contents() -> Dict[str, bytes]:
    """The kit's files by name, in KIT_FILES order."""
    return {"vmloader-agent.zip": agent_bundle(), "adopt.sh": adopt_script(),
            **{name: (AGENT_DIR / name).read_bytes() for name in KIT_FILES[2:]}}


def write_kit(dest: Path) -> List[Path]:
    """The kit's files in `dest` (made if absent; files of an older kit there are replaced)."""
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest} exists and is not a directory", hint="name a new or an empty directory")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in kit_contents().items():
        path = dest / name
        path.unlink(missing_ok=True)            # never write through a link someone left there
        path.write_bytes(data)
        path.chmod(0o755 if name.endswith(".sh") else 0o644)
        written.append(path)
    return written

"""A per-job cloud-init NoCloud seed: a small vfat disk labelled `cidata`, made without root.

Its user-data writes vmloader's agent and adopt.sh into /run/vmloader-agent and runs
adopt.sh from `bootcmd` (cloud-init's earliest stage: no waiting for the network or
the final stage). meta-data gives a per-job instance-id (so cloud-init treats every job
as a new instance, never reusing a kept one's state) and hostname. The domain's SMBIOS
serial says `ds=nocloud`, so cloud-init looks at this seed only and no network
metadata service is waited for. It also asks cloud-init for one ssh host key type, ed25519
(the one `snapshot boot --ssh` pins), instead of its default rsa, ecdsa and ed25519: every
job is a new instance, so cloud-init makes the keys again in every job's VM, and a 3072-bit
RSA key took seconds of the guest's one vCPU under TCG, beside the job that had just started.

Built with mtools (`mformat`, `mcopy`): files written into a disk image, no mount.
"""
import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from . import privatefiles
from .delivery import CLOUD_INIT, GUEST_DIR, adopt_script, agent_bundle
from .errors import VMLoaderError

SEED_KIB = 1440               # a floppy-sized vfat: mformat's -f 1440 needs no geometry
SMBIOS_SERIAL = "ds=nocloud"


def user_data() -> str:
    zip_b64 = base64.b64encode(agent_bundle()).decode()
    script_b64 = base64.b64encode(adopt_script()).decode()
    command = (f"umask 077; mkdir -p {GUEST_DIR} && "
               f"echo {zip_b64} | base64 -d > {GUEST_DIR}/vmloader-agent.zip && "
               f"echo {script_b64} | base64 -d > {GUEST_DIR}/adopt.sh && "
               f"sh {GUEST_DIR}/adopt.sh {GUEST_DIR} {CLOUD_INIT}")
    # JSON is YAML: no hand-quoting of the command.
    config = {"bootcmd": [["sh", "-c", command]], "ssh_genkeytypes": ["ed25519"]}
    return "#cloud-config\n" + json.dumps(config) + "\n"


def meta_data(job_id: str, hostname: str) -> str:
    return json.dumps({"instance-id": f"vmloader-{job_id}", "local-hostname": hostname}) + "\n"


def make_seed(path: Path, job_id: str, hostname: str, user_data_text: Optional[str] = None) -> None:
    """Write the seed disk to `path` (private to the job's user); `user_data_text` instead of ours
    (bench/stock_images.py boots an image with a seed that asks nothing of it)."""
    for tool in ("mformat", "mcopy"):
        if shutil.which(tool) is None:
            raise VMLoaderError(f"cannot make the cloud-init seed: {tool} is missing on this worker",
                                hint="install Debian's mtools package (scripts/setup-host.sh does)", phase="setup")
    files = {"user-data": user_data() if user_data_text is None else user_data_text,
             "meta-data": meta_data(job_id, hostname)}
    work = path.parent
    with open(privatefiles.open_private(path), "wb") as seed:
        seed.truncate(SEED_KIB * 1024)
    _run(["mformat", "-i", str(path), "-f", str(SEED_KIB), "-v", "cidata", "::"])
    for name, text in files.items():
        source = work / f".seed-{name}"
        privatefiles.write_private(source, text)
        try:
            _run(["mcopy", "-o", "-i", str(path), str(source), f"::{name}"])
        finally:
            source.unlink(missing_ok=True)


def _run(args: list) -> None:
    result = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "MTOOLS_SKIP_CHECK": "1"})
    if result.returncode != 0:
        raise VMLoaderError(f"cannot make the cloud-init seed: {args[0]} failed: {result.stderr.strip()[-300:]}",
                            phase="define")

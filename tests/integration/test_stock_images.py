"""A distribution-style cloud image (grub in the MBR, systemd, cloud-init, qemu-guest-agent, no vmloader
file inside) registered with `images add` and run unmodified: firmware boot, the agent delivered at boot.

Stock images boot slowly under TCG (their own boot loader, systemd, cloud-init): few boots, each
checking several things.
"""
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from . import stockimage

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]


@pytest.fixture(scope="module")
def stock_bios_disk():
    if os.geteuid() != 0:
        pytest.skip("building the stock test image needs root")
    return stockimage.build(stockimage.BOOKWORM_BIOS)


@pytest.fixture
def own_cache():
    path = Path(tempfile.mkdtemp(prefix="vmloader-stock-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def test_a_stock_bios_image_runs_jobs_with_the_agent_delivered_at_boot_and_stays_byte_identical(
        vmloader, stock_bios_disk, own_cache, tmp_path):
    disk = tmp_path / "stock.qcow2"
    shutil.copyfile(stock_bios_disk, disk)
    # A stock image boots its own firmware, grub, systemd and cloud-init: under TCG on a busy
    # host that takes minutes (about 40 s alone), so the boot deadline is generous.
    env = {"VMLOADER_CACHE_DIR": str(own_cache), "VMLOADER_BOOT_TIMEOUT": "900"}
    added = vmloader("images", "add", "stock-bookworm", "--disk", str(disk), "--json", env_extra=env)
    assert added.returncode == 0, added.err
    entry = added.json()
    assert entry["boot"] == "bios"                       # read from the disk: grub's code in the MBR
    base = own_cache / "artifacts" / entry["artifacts"]["disk"]["sha256"]
    before = entry["artifacts"]["disk"]["sha256"]

    # As root, with no network: the NIC reaches nothing, yet the boot does not wait for it.
    root = vmloader("run", "--image", "stock-bookworm", "--network", "none", "--root", "--snapshot", "never",
                    "--json", "--", "sh", "-c",
                    "id -u; echo to-stderr >&2; echo kept > /root/mark && cat /root/mark; "
                    "test -e /usr/lib/vmloader && echo baked-in; exit 7", env_extra=env, timeout=900)
    result = root.json()
    assert root.returncode == 7, result["error"]
    assert result["agent_delivery"] in ("qemu-guest-agent", "cloud-init")   # whichever came first
    assert Path(result["stdout_path"]).read_text().split() == ["0", "kept"]
    assert Path(result["stderr_path"]).read_text() == "to-stderr\n"
    meta = json.loads((Path(result["job_dir"]) / "metadata.json").read_text())
    assert meta["agent_delivery"] == result["agent_delivery"]

    # As the job user the image lacks: made at run time, clear of the image's own users.
    user = vmloader("run", "--image", "stock-bookworm", "--snapshot", "never", "--", "sh", "-c",
                    "id -un; id -u; pwd; cat", input=b"from stdin\n", env_extra=env, timeout=900)
    assert user.returncode == 0, user.err
    name, uid, cwd, line = user.out.split("\n")[:4]
    assert (name, cwd, line) == ("vmloader", "/work", "from stdin")
    assert int(uid) >= 60000

    assert sha256(disk) == before
    assert not base.exists() or sha256(base) == before

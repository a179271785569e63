"""The agent as an image build installs it: its bytecode compiled in when the guest's python matches."""
import importlib.util
import marshal
import os
import shutil
import sys
from pathlib import Path

from vmloader.bootstrapper import build

HERE = f"python{sys.version_info.major}.{sys.version_info.minor}"


def _tree(root: Path, python: str) -> Path:
    (root / "usr/bin").mkdir(parents=True)
    os.symlink(python, root / "usr/bin/python3")
    lib = root / "usr/lib/vmloader"
    for path in build._agent_sources():
        dest = lib / "vmloader" / path.relative_to(build.PACKAGE_ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return lib


def test_the_agent_is_compiled_for_a_guest_python_of_this_version(tmp_path):
    lib = _tree(tmp_path, HERE)
    assert build._compile_agent(tmp_path, lib)
    pyc = Path(importlib.util.cache_from_source(str(lib / "vmloader/agent/server.py")))
    data = pyc.read_bytes()
    assert int.from_bytes(data[4:8], "little") == 0b01          # hash-based, unchecked: file times do not matter
    assert marshal.loads(data[16:]).co_filename == "/usr/lib/vmloader/vmloader/agent/server.py"


def test_a_guest_python_of_another_version_compiles_the_agent_itself(tmp_path):
    lib = _tree(tmp_path, "python3.5")
    assert not build._compile_agent(tmp_path, lib)
    assert not list(lib.rglob("*.pyc"))


def test_a_change_of_the_default_kernel_command_line_rebuilds_the_image(monkeypatch):
    from vmloader.bootstrapper.catalog import EMBEDDED_MANIFEST, load_manifest
    image = load_manifest(EMBEDDED_MANIFEST).find("debian-12")
    before = build.image_key(image)
    monkeypatch.setattr(build, "default_cmdline", lambda recipe: "root=/dev/vda rw console=ttyS0 quiet")
    assert build.image_key(image) != before

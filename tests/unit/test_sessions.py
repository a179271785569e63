"""Attaching to a booted snapshot: who is running it, and which agent port is free."""
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmloader.bootstrapper import sessions
from vmloader.bootstrapper.errors import SnapshotError, UsageError
from vmloader.bootstrapper.snapshots import Snapshot, SnapshotMeta


def snapshot(tmp_path: Path) -> Snapshot:
    meta = SnapshotMeta(id="snap", created=0.0, image="debian-12@12.x", image_sha256="0" * 64, base_path="/b",
                        command=["true"], exit_status=1, outcome="failed", user="me", hostname="h")
    return Snapshot(meta, tmp_path)


def test_a_boot_whose_process_is_gone_is_not_booted(tmp_path):
    snap = snapshot(tmp_path)
    assert sessions.booted(snap) is None
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    snap.booted_file.write_text(json.dumps({"pid": int(done.stdout), "sockets": []}))
    assert sessions.booted(snap) is None
    snap.booted_file.write_text(json.dumps({"pid": os.getpid(), "sockets": []}))
    assert sessions.booted(snap)["pid"] == os.getpid()


def test_attaching_when_every_port_is_taken_says_so(tmp_path):
    snap = snapshot(tmp_path)
    sockets = [str(tmp_path / f"attach-{n}.sock") for n in (1, 2)]
    held = []
    for path in sockets:                       # two shells already attached
        lock = open(f"{path}.lock", "a")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(lock)
    info = {"pid": os.getpid(), "sockets": sockets}
    with pytest.raises(SnapshotError, match="all its 2 attach ports are in use"):
        with sessions.attach(snap, info, root=False):
            pass


def test_attaching_to_a_dead_socket_names_it(tmp_path):
    snap = snapshot(tmp_path)
    info = {"pid": os.getpid(), "sockets": [str(tmp_path / "attach-1.sock")]}
    with pytest.raises(SnapshotError, match="does not answer"):
        with sessions.attach(snap, info, root=False):
            pass


def test_ssh_without_a_key_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UsageError, match="no public key in") as error:
        sessions.default_ssh_key()
    assert "ssh-keygen -t ed25519" in error.value.hint
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "id_ed25519.pub").write_text("ssh-ed25519 AAAA me\n")
    assert sessions.default_ssh_key() == tmp_path / ".ssh" / "id_ed25519.pub"

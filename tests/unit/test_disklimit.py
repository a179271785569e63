"""The overlay watch: past the job's disk limit it fires once, with an error naming the limit."""
import time
from pathlib import Path

from vmloader.bootstrapper.disklimit import MIB, DiskLimit, DiskLimitExceeded, OverlayWatch, allocated
from vmloader.bootstrapper.errors import EXIT_INFRA


def test_allocated_counts_written_blocks_not_the_apparent_size(tmp_path):
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(64 * MIB)
    written = tmp_path / "written"
    written.write_bytes(b"x" * MIB)
    assert allocated(sparse) < MIB <= allocated(written)
    assert allocated(tmp_path / "gone") == 0


def test_the_watch_fires_once_past_the_limit_and_names_it(tmp_path):
    overlay = tmp_path / "overlay.qcow2"
    overlay.write_bytes(b"x" * MIB)
    fired = []
    watch = OverlayWatch(overlay, DiskLimit(2 * MIB, "request_disk 3072 KiB less the sandbox's 1024 KiB"),
                         fired.append, interval=0.01).start()
    try:
        time.sleep(0.1)
        assert fired == [] and watch.breach is None          # under the limit: nothing happens
        with open(overlay, "ab") as f:
            f.write(b"y" * 2 * MIB)
        deadline = time.monotonic() + 30
        while not fired and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        watch.stop()
    assert len(fired) == 1 and fired[0] >= 3 * MIB
    assert watch.check() and len(fired) == 1                  # once only
    err = watch.breach
    assert isinstance(err, DiskLimitExceeded) and err.exit_code == EXIT_INFRA and err.phase == "exec"
    assert "disk limit" in err.message and "2 MiB allowed" in err.message
    assert "request_disk 3072 KiB less the sandbox's 1024 KiB" in err.message and "request_disk" in err.hint


def test_check_without_the_thread_sees_the_last_writes(tmp_path):
    overlay = tmp_path / "overlay.qcow2"
    overlay.write_bytes(b"x" * 3 * MIB)
    watch = OverlayWatch(overlay, DiskLimit(2 * MIB), lambda used: None)
    assert watch.check() and watch.breach is not None

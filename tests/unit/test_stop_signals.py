"""A stop signal (condor_rm's SIGTERM, Ctrl-C) stops a job wherever it lands, never cuts its
teardown short, and is never taken for a failure some code tolerates (stopsignals.py)."""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from vmloader.bootstrapper import stopsignals
from vmloader.bootstrapper.errors import Interrupted, VMLoaderError
from vmloader.bootstrapper.job import JobRunner

from fakemachine import FakeMachines
from test_job_runner import Rig, torn_down, world  # noqa: F401  (world: a fixture)
from test_warm_start import lanes_of


@pytest.fixture
def stop_handlers():
    """The CLI's handlers for the test; the previous ones back after it."""
    previous = {sig: signal.getsignal(sig) for sig in stopsignals.STOP_SIGNALS}
    stopsignals.install()
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _deliver(sig: signal.Signals) -> None:
    """Send `sig` to this process and give its handler the chance to run (in the main thread)."""
    os.kill(os.getpid(), sig)
    for _ in range(100):
        time.sleep(0.01)


def test_the_first_stop_signal_is_raised_past_code_that_tolerates_failures_and_later_ones_are_ignored(
        stop_handlers):
    with pytest.raises(Interrupted) as stopped:
        try:
            _deliver(signal.SIGTERM)
        except VMLoaderError:                               # e.g. "the warm state is unusable: boot cold"
            pytest.fail("a stop signal was taken for a failure the code tolerates")
    assert stopped.value.exit_code == 128 + signal.SIGTERM and "SIGTERM" in stopped.value.message
    _deliver(signal.SIGHUP)                                 # the teardown must not be cut short by it
    assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in stopsignals.STOP_SIGNALS)


def test_a_stop_signal_inside_a_held_block_is_raised_once_the_block_is_done(stop_handlers):
    done = []
    with pytest.raises(Interrupted) as stopped:
        with stopsignals.held():
            _deliver(signal.SIGINT)
            done.append("teardown")
    assert done == ["teardown"] and stopped.value.exit_code == 128 + signal.SIGINT


def _signalling(method, sig: signal.Signals, after: bool = False):
    """`method`, sending `sig` on its first call before it runs (`after`: once it has run)."""
    sent = []

    def wrapped(*args, **kwargs):
        if not sent and not after:
            sent.append(sig)
            _deliver(sig)
        result = method(*args, **kwargs)
        if not sent and after:
            sent.append(sig)
            _deliver(sig)
        return result
    return wrapped


def test_a_job_stopped_while_its_warm_state_is_built_ends_there_and_leaves_nothing_running(
        world, stop_handlers, monkeypatch):
    # Before, the build's `except VMLoaderError` took the SIGTERM for a failed build: "booting
    # cold", and the job ran to its end with every later signal ignored.
    rig = Rig(world, warm_start=True)
    monkeypatch.setattr(JobRunner, "_connect_agent", _signalling(JobRunner._connect_agent, signal.SIGTERM))
    result = rig.run("echo", "ran anyway", snapshot="on-failure")
    assert result.exit_status == 128 + signal.SIGTERM and result.error["error"] == "Interrupted"
    assert result.error["phase"] == "warm build"
    assert rig.out.getvalue() == b"" and "boots cold" not in rig.err.getvalue().decode()
    assert rig.fake.kinds().count("create") == 1 and torn_down(rig.fake)      # the build's VM, destroyed
    assert lanes_of(rig) == [] and result.snapshot is None                  # the command never ran


def test_a_stop_signal_during_teardown_waits_until_the_state_is_kept(world, stop_handlers, monkeypatch):
    # Before, raised in the output copy-back it skipped keeping the snapshot and the job record.
    rig = Rig(world)
    monkeypatch.setattr(JobRunner, "_collect_outputs", _signalling(JobRunner._collect_outputs, signal.SIGTERM))
    out_dir = world / "outputs"
    out_dir.mkdir()
    with pytest.raises(Interrupted):
        rig.run("sh", "-c", "echo data > result.txt", outputs=("result.txt",), output_dir=out_dir,
                snapshot="always", job_id="stopped-in-teardown")
    assert torn_down(rig.fake)
    assert (out_dir / "result.txt").read_text() == "data\n"
    assert rig.store.get("stopped-in-teardown").meta.exit_status == 0
    record = json.loads(Path(rig.config.jobs_dir, "stopped-in-teardown", "metadata.json").read_text())
    assert record["exit_status"] == 0 and record["snapshot"] == "stopped-in-teardown"


def test_a_stop_signal_as_the_vm_is_created_still_stops_that_vm(world, stop_handlers, monkeypatch):
    # Landing while libvirt creates the VM, it was raised before the runner held the machine:
    # the VM ran on after vmloader had gone (until another vmloader reaped it).
    rig = Rig(world)
    monkeypatch.setattr(FakeMachines, "create", _signalling(FakeMachines.create, signal.SIGTERM, after=True))
    result = rig.run("echo", "ran anyway", snapshot="never")
    assert result.exit_status == 128 + signal.SIGTERM and result.error["phase"] == "define"
    assert rig.out.getvalue() == b"" and torn_down(rig.fake)

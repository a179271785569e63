"""`vmloader run` through real libvirt + QEMU boots of the debian-12 image."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmloader.bootstrapper import config
from vmloader.bootstrapper.cache import ImageCache, sha256_file

from .conftest import next_line

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]


def snapshots(state_dir: Path) -> list:
    root = state_dir / "snapshots"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def test_a_successful_command_runs_in_the_guest_and_leaves_no_snapshot(vmloader, state_dir):
    run = vmloader("run", "--image", "debian-12", "--", "sh", "-c", "uname -r; hostname; id -u")
    assert run.returncode == 0, run.err
    kernel, hostname, uid = run.out.split()
    assert hostname != os.uname().nodename and hostname.startswith("vm-")
    assert kernel.endswith("cloud-amd64")
    assert uid == "1000"
    assert snapshots(state_dir) == []
    assert "succeeded (exit 0)" in run.err


def test_the_commands_exit_code_is_vmloaders_and_failure_keeps_a_snapshot(vmloader, state_dir):
    run = vmloader("run", "--image", "debian-12", "--", "sh", "-c", "echo partial-output; echo partial > /work/trace; exit 7")
    assert run.returncode == 7, run.err
    [snap] = snapshots(state_dir)
    meta = json.loads((state_dir / "snapshots" / snap / "metadata.json").read_text())
    assert meta["exit_status"] == 7 and meta["command"][-1].endswith("exit 7")
    assert set(meta["timings"]) >= {"cache lookup", "overlay", "define", "boot", "exec", "teardown"}
    assert (state_dir / "snapshots" / snap / "disk.qcow2").stat().st_size > 0
    assert "boot" in (state_dir / "snapshots" / snap / "console.log").read_text(errors="replace").lower() or \
        (state_dir / "snapshots" / snap / "console.log").stat().st_size > 0
    listed = vmloader("snapshot", "list", "--json")
    assert [s["id"] for s in listed.json()] == [snap]
    logs = vmloader("snapshot", "logs", snap, "--json").json()
    assert logs["stdout_tail"] == "partial-output\n"
    assert logs["console_tail"] and logs["timings"]["exec"] > 0
    shown = vmloader("snapshot", "show", snap, "--json").json()
    assert shown["exit_status"] == 7 and shown["disk"].endswith("disk.qcow2")
    assert vmloader("snapshot", "rm", snap).returncode == 0
    assert snapshots(state_dir) == []


def test_death_by_signal_exits_128_plus_the_signal_and_console_follows_the_boot(vmloader):
    run = vmloader("run", "--image", "debian-12", "--snapshot", "never", "--console", "--cold", "--",
                   "sh", "-c", "kill -TERM $$")
    assert run.returncode == 128 + signal.SIGTERM, run.err
    assert "vmloader-init: starting agent" in run.err


def test_a_command_missing_in_the_guest_exits_127_with_a_message(vmloader, state_dir):
    run = vmloader("run", "--image", "debian-12", "--", "no-such-command-here")
    assert run.returncode == 127
    assert "no-such-command-here" in run.err


def test_stdout_and_stderr_stay_separate_and_20_mb_of_binary_output_is_intact(vmloader):
    script = ("head -c 20000000 /dev/urandom > /tmp/blob; echo to-stderr >&2; "
              "sha256sum /tmp/blob >&2; cat /tmp/blob")
    run = vmloader("run", "--image", "debian-12", "--snapshot", "never", "--", "sh", "-c", script)
    assert run.returncode == 0, run.err
    assert len(run.stdout) == 20_000_000
    assert "to-stderr" in run.err
    assert hashlib.sha256(run.stdout).hexdigest() in run.err


def test_stdin_is_forwarded_to_the_command(vmloader):
    run = vmloader("run", "--image", "debian-12", "--snapshot", "never", "--", "sha256sum",
                   input=b"x" * 300_000)
    assert run.returncode == 0, run.err
    assert hashlib.sha256(b"x" * 300_000).hexdigest() in run.out


def test_root_runs_as_uid_0_and_the_next_job_starts_from_the_clean_base(vmloader, built_image):
    base = ImageCache(config.load().cache_dir).artifact_path(built_image.artifacts["disk"])
    run = vmloader("run", "--image", "debian-12", "--root", "--snapshot", "always", "--",
                   "sh", "-c", "id -u; echo dirty > /etc/vmloader-marker; sync")
    assert run.returncode == 0, run.err
    assert run.out.strip() == "0"
    again = vmloader("run", "--image", "debian-12", "--", "sh", "-c", "id -u; cat /etc/vmloader-marker")
    assert again.returncode == 1
    assert again.out.strip() == "1000"
    assert "No such file" in again.err
    assert sha256_file(base) == built_image.artifacts["disk"].sha256


def test_input_files_go_in_and_output_files_come_back_even_on_failure(vmloader, tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("hello from the host\n")
    run = vmloader("run", "--image", "debian-12", "--input", str(src), "--output", "result/out.txt",
                   "--output-dir", str(tmp_path / "back"), "--snapshot", "never", "--",
                   "sh", "-c", "mkdir -p result; tr a-z A-Z < input.txt > result/out.txt; exit 3")
    assert run.returncode == 3, run.err
    assert (tmp_path / "back" / "result" / "out.txt").read_text() == "HELLO FROM THE HOST\n"


def test_timeout_stops_the_job_with_124_and_keeps_its_state(vmloader, state_dir):
    run = vmloader("run", "--image", "debian-12", "--timeout", "5", "--", "sleep", "1000")
    assert run.returncode == 124, run.err
    [snap] = snapshots(state_dir)
    meta = json.loads((state_dir / "snapshots" / snap / "metadata.json").read_text())
    assert meta["outcome"] == "timeout"


def test_json_output_reports_phases_and_where_the_output_went(vmloader):
    run = vmloader("run", "--image", "debian-12", "--json", "--snapshot", "never", "--env", "GREETING=hi there",
                   "--", "sh", "-c", 'echo "$GREETING"')
    assert run.returncode == 0, run.err
    result = run.json()
    assert result["exit_status"] == 0 and result["outcome"] == "succeeded"
    assert Path(result["stdout_path"]).read_text() == "hi there\n"
    assert set(result["timings"]) >= {"cache lookup", "overlay", "define", "boot", "exec",
                                       "collect", "snapshot", "teardown"}


def test_output_streams_live_not_after_the_command_exits(vm_env, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "vmloader.bootstrapper.cli", "run", "--image", "debian-12",
                             "--snapshot", "never", "--", "sh", "-c", "echo first; sleep 6; echo second"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=vm_env, cwd=tmp_path)
    first = next_line(proc)
    seen_first = time.monotonic()
    second = next_line(proc)
    seen_second = time.monotonic()
    assert proc.wait(timeout=300) == 0
    assert (first, second) == (b"first\n", b"second\n")
    assert seen_second - seen_first > 4


def test_network_none_gives_the_guest_no_interface(vmloader):
    run = vmloader("run", "--image", "debian-12", "--network", "none", "--snapshot", "never", "--",
                   "ls", "/sys/class/net")
    assert run.returncode == 0, run.err
    assert run.out.split() == ["lo"]

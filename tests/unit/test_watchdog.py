"""The suite's watchdog (tests/watchdog.py): a test past its budget fails with a report, the run goes on."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

HUNG = '''
import subprocess, sys
import pytest

@pytest.fixture(scope="module")
def server():                   # a module's own server (as the HTCondor pool): it outlives a hung test
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()

def test_first(server):
    pass

def test_waits_on_a_child_that_never_ends(server):
    subprocess.run([sys.executable, "-c", "import time; print('child up', flush=True); time.sleep(600)"])

def test_after_it(server):
    assert server.poll() is None
'''


def test_a_test_past_its_budget_fails_with_the_process_tree_and_stacks_and_the_next_test_runs(tmp_path):
    """...with the module's server it did not start still up."""
    (tmp_path / "test_hung.py").write_text(HUNG)
    env = {"PATH": "/usr/bin:/bin", "VMLOADER_TEST_BUDGET": "3", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.watchdog",
                          "-c", "/dev/null", "--rootdir", str(tmp_path), str(tmp_path / "test_hung.py")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=300)
    out, err = run.stdout.decode(), run.stderr.decode()
    assert run.returncode == 1, out + err
    assert "1 failed, 2 passed" in out, out
    assert "ran past its budget of 3 s" in out, out
    assert "WATCHDOG: test_hung.py::test_waits_on_a_child_that_never_ends ran" in err, err
    assert "time.sleep(600)" in err, err                  # the process tree names the hung child
    assert "this test's own threads" in err, err

"""A test that runs past its budget is reported with what the machine was doing, then fails.

CI gives the whole suite 90 minutes. Every wait in a test has its own deadline, but a wait that has
none (a bug in a test, or in vmloader) would hang the run until CI gives up and prints nothing of
why. With this, one hung test costs its budget and leaves on stderr: the test, the process tree,
libvirt's domains, the Python stacks of the test's child processes (py-spy) and of the test itself.
Then what the test started is ended: the test fails if that freed it, else its process ends
(under xdist: "worker crashed", and the run goes on with a new worker).
"""
import faulthandler
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

import psutil
import pytest

BUDGET = float(os.environ.get("VMLOADER_TEST_BUDGET", "1500"))       # seconds, setup to teardown


class Watchdog:
    def __init__(self, budget: float):
        self.budget = budget
        self.out = os.dup(2)        # before capture: the terminal (xdist shows a worker's stderr)
        self.timer: Optional[threading.Timer] = None
        self.before: set = set()
        self.expired = self.reported = False
        self.done = threading.Event()

    def start(self, nodeid: str) -> None:
        self.expired = self.reported = False
        self.done = threading.Event()
        self.before = {child.pid for child in psutil.Process().children(recursive=True)}
        self.timer = threading.Timer(self.budget, self.expire, args=(nodeid, time.monotonic()))
        self.timer.daemon = True
        self.timer.start()

    def cancel(self) -> None:
        self.done.set()
        if self.timer is not None:
            self.timer.cancel()

    def say(self, text: str) -> None:
        os.write(self.out, text.encode("utf-8", "replace"))

    def show(self, argv: list) -> None:
        try:
            out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 timeout=60).stdout.decode("utf-8", "replace")
        except (OSError, subprocess.TimeoutExpired) as err:
            out = f"({err})\n"
        self.say(f"--- {' '.join(argv)}\n" + "".join(line[:400] + "\n" for line in out.splitlines()))

    def expire(self, nodeid: str, started: float) -> None:
        self.expired = True
        self.say(f"\n*** WATCHDOG: {nodeid} ran {time.monotonic() - started:.0f} s, past its budget of "
                 f"{self.budget:.0f} s (VMLOADER_TEST_BUDGET); what this machine is doing:\n")
        self.show(["ps", "-ww", "--ppid", "2", "-p", "2", "--deselect", "--forest",   # no kernel threads
                   "-o", "pid,ppid,user,stat,etimes,wchan:24,args"])
        self.show(["virsh", "-c", "qemu:///system", "list", "--all"])
        children = psutil.Process().children(recursive=True)
        spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        for child in children:
            try:
                python = "python" in child.name()
            except psutil.Error:
                continue
            if python and os.path.exists(spy):
                self.show([spy, "dump", "--pid", str(child.pid)])
        self.say("--- this test's own threads\n")
        faulthandler.dump_traceback(file=self.out, all_threads=True)
        # What this test started ends (ours alone, by pid; vmloader ends its VM on SIGTERM). A module's
        # own servers, running when it started (the HTCondor pool), stay up for the module's next tests.
        end([child for child in children if child.pid not in self.before])
        if self.done.wait(120):         # the test came back (and fails): the run goes on here
            return
        self.say(f"*** WATCHDOG: ending this test process ({os.getpid()}) and all it started\n")
        end(psutil.Process().children(recursive=True))
        os._exit(70)


def end(processes: list) -> None:
    """SIGTERM, a minute to exit, then SIGKILL."""
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=60)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


def pytest_configure(config) -> None:
    config.pluginmanager.register(Watchdog(BUDGET), "vmloader-watchdog")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    dog = item.config.pluginmanager.get_plugin("vmloader-watchdog")
    dog.start(item.nodeid)
    try:
        yield
    finally:
        dog.cancel()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    dog = item.config.pluginmanager.get_plugin("vmloader-watchdog")
    if dog.expired and not report.failed and not dog.reported:
        dog.reported = True
        report.outcome = "failed"
        report.longrepr = f"ran past its budget of {dog.budget:.0f} s: the watchdog's report is on stderr"

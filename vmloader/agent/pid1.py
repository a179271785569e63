"""PID 1 duties when the agent is the guest's init: reap every orphan, keep the agent alive."""
import os
import sys
import time


def log(message):
    sys.stderr.write("vmloader-agent: %s\n" % message)
    sys.stderr.flush()


def _spawn(target):
    pid = os.fork()
    if pid == 0:
        try:
            target()
            code = 0
        except BaseException as exc:   # the child must never return into the reaper loop
            log("agent crashed: %r" % (exc,))
            code = 1
        os._exit(code)
    return pid


def run_as_pid1(target):
    """Run `target` in a child; reap all children forever; restart the agent when it dies."""
    agent = _spawn(target)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(1)
            continue
        except InterruptedError:
            continue
        if pid == agent:
            log("agent exited (status %d); restarting in 1 s" % status)
            time.sleep(1)
            agent = _spawn(target)

"""Entry point inside the guest: `python3 -m vmloader.agent [--pid1]`."""
import argparse
import sys
import threading

from ..protocol import ATTACH_PORTS, CHANNEL_NAME, CHANNEL_PREFIX
from .pid1 import run_as_pid1
from .server import Agent
from .transport import find_port, open_port


def serve(port_name):
    """Serve the job's port; also every attach port the VM has (older hosts give it none)."""
    transport = open_port(port_name)
    if port_name == CHANNEL_NAME:
        for number in range(1, ATTACH_PORTS + 1):
            dev = find_port(CHANNEL_PREFIX + str(number))
            if dev:
                threading.Thread(target=_serve_attach_port, args=(CHANNEL_PREFIX + str(number),),
                                 daemon=True).start()
    Agent(transport).serve()


def _serve_attach_port(name):
    try:
        Agent(open_port(name, wait=5.0)).serve()
    except Exception as exc:        # an attach port failing must not take the job's port down
        sys.stderr.write("vmloader-agent: port %s: %r\n" % (name, exc))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="vmloader-agent")
    parser.add_argument("--pid1", action="store_true",
                        help="stay PID 1: reap orphans, run and restart the agent in a child")
    parser.add_argument("--port-name", default=CHANNEL_NAME)
    args = parser.parse_args(argv)
    if args.pid1:
        run_as_pid1(lambda: serve(args.port_name))
    else:
        serve(args.port_name)


if __name__ == "__main__":
    sys.exit(main())

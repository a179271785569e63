"""Entry point inside the guest: `python3 -m vmloader.agent [--pid1]`."""
import argparse
import sys

from ..protocol import CHANNEL_NAME
from .pid1 import run_as_pid1
from .server import Agent
from .transport import open_port


def serve(port_name):
    transport = open_port(port_name)
    Agent(transport).serve()


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

"""Entry point inside the guest: `python3 -m vmloader.agent [--pid1] [--port-name NAME]`.

No argparse: with gettext and textwrap it is about a tenth of a second of a cold TCG guest's boot,
for two options.
"""
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


USAGE = "usage: vmloader-agent [--pid1] [--port-name NAME]"


def parse_args(argv):
    """(pid1, port_name) from the command line; SystemExit(2) with the usage on a bad one."""
    pid1, port_name = False, CHANNEL_NAME
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--pid1":
            pid1 = True
        elif arg == "--port-name" and args:
            port_name = args.pop(0)
        elif arg.startswith("--port-name="):
            port_name = arg[len("--port-name="):]
        elif arg in ("-h", "--help"):
            print(USAGE + "\n  --pid1            stay PID 1: reap orphans, run and restart the agent"
                  " in a child\n  --port-name NAME  the virtio-serial port to serve")
            raise SystemExit(0)
        else:
            sys.stderr.write("%s\nvmloader-agent: error: unrecognized argument %r\n" % (USAGE, arg))
            raise SystemExit(2)
    if not port_name:
        sys.stderr.write("%s\nvmloader-agent: error: --port-name needs a name\n" % USAGE)
        raise SystemExit(2)
    return pid1, port_name


def main(argv=None):
    pid1, port_name = parse_args(sys.argv[1:] if argv is None else argv)
    if pid1:
        run_as_pid1(lambda: serve(port_name))
    else:
        serve(port_name)


if __name__ == "__main__":
    sys.exit(main())

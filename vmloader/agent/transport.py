"""How the agent reaches the host: a virtio-serial port (or, in tests, a socket)."""
import errno
import glob
import os
import time


class PortTransport(object):
    """A virtio-serial port. Reads return b"" while no host is connected: wait, don't quit."""

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR)

    def read(self, size):
        while True:
            try:
                data = os.read(self.fd, size)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    time.sleep(0.1)
                    continue
                raise
            if data:
                return data
            time.sleep(0.2)          # host side not connected (yet, or any more)

    def write(self, data):
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]


class SocketTransport(object):
    def __init__(self, sock):
        self.sock = sock

    def read(self, size):
        return self.sock.recv(size)

    def write(self, data):
        self.sock.sendall(data)


def find_port(name, sysfs="/sys/class/virtio-ports"):
    for path in sorted(glob.glob(os.path.join(sysfs, "*", "name"))):
        try:
            with open(path) as handle:
                if handle.read().strip() == name:
                    return "/dev/" + os.path.basename(os.path.dirname(path))
        except OSError:
            continue
    return None


def open_port(name, wait=60.0):
    """Find the port named `name` (the init script loaded virtio_console) and open it."""
    deadline = time.time() + wait
    while True:
        dev = find_port(name)
        if dev and os.path.exists(dev):
            return PortTransport(dev)
        if time.time() > deadline:
            raise RuntimeError("no virtio-serial port named %s (is virtio_console loaded?)" % name)
        time.sleep(0.2)

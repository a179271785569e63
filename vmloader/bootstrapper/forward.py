"""Port forwarding into a guest over the agent channel: the guest needs no network.

Each forwarded guest port is a Unix socket (`guest-PORT.sock`, mode 0600) in a private
0700 directory of the user who booted the snapshot, so only that user (and root)
can connect: another local user gets EACCES at the directory. There is no TCP
listener: on loopback any local user could connect to it, and making a TCP port
owner-only would take machinery vmloader does not have (per-uid firewall rules, or
an ident-style lookup of the connecting process's owner).
"""
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, List, Optional

from .agentclient import AgentClient
from .errors import UsageError, VMLoaderError
from .privatedir import PrivateDir, connect_unix


@dataclass(frozen=True)
class Forward:
    guest_port: int

    @property
    def socket_name(self) -> str:
        return f"guest-{self.guest_port}.sock"


def parse_forward(text: str) -> Forward:
    """GUEST port, e.g. 80. The old HOST:GUEST form is accepted (HOST is ignored: no TCP port
    is opened; see `legacy_host_port`)."""
    host, _, guest = text.partition(":") if ":" in text else ("0", ":", text)
    if not (host.isdigit() and guest.isdigit() and int(host) < 65536 and 0 < int(guest) < 65536):
        raise UsageError(f"--forward {text!r}: expected GUEST_PORT (or the old HOST_PORT:GUEST_PORT)",
                         hint="e.g. --forward 80: the guest's port 80 becomes a Unix socket only you can open")
    return Forward(int(guest))


def legacy_host_port(text: str) -> bool:
    return ":" in text


class Forwarder:
    """Listens on one Unix socket in `directory`; each connection becomes a stream to the guest port."""

    def __init__(self, client: AgentClient, forward: Forward, directory: PrivateDir):
        self.client = client
        self.forward = forward
        self.directory = directory
        self.path = directory.path / forward.socket_name
        try:
            self.listener = directory.listen(forward.socket_name)
        except OSError as exc:
            raise UsageError(f"--forward {forward.guest_port}: cannot listen on {self.path}: {exc.strerror}",
                             hint=f"check that {directory.path} is yours and its file system takes sockets") \
                from None
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return                                  # closed
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        try:
            stream = self.client.connect(self.forward.guest_port)
        except VMLoaderError:
            _end(conn)
            return

        def up() -> None:
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        stream.send_eof()
                        return
                    stream.send(data)
            except (OSError, VMLoaderError):
                return
        threading.Thread(target=up, daemon=True).start()
        try:
            while True:
                data = stream.recv()
                if not data:
                    break
                conn.sendall(data)
        except (OSError, VMLoaderError):
            pass
        finally:
            stream.close()
            _end(conn)

    def close(self) -> None:
        _end(self.listener)
        self.directory.unlink(self.forward.socket_name)


def _end(sock: socket.socket) -> None:
    """Shut down, then close: a bare close() leaves the connection open while another
    thread is still blocked in recv() on it, so the far end would never see the end."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def start_all(client: AgentClient, forwards: List[Forward], directory: PrivateDir) -> List[Forwarder]:
    started: List[Forwarder] = []
    try:
        for forward in dict.fromkeys(forwards):         # one socket per guest port
            started.append(Forwarder(client, forward, directory))
    except BaseException:               # (a stop signal too)
        for forwarder in started:
            forwarder.close()
        raise
    return started


# -- the client side: stdio <-> a forward's socket (ssh's ProxyCommand) ------------
def open_forward(path: Path) -> socket.socket:
    try:
        return connect_unix(path)
    except PermissionError:
        raise UsageError(f"{path}: permission denied",
                         hint="a forwarded port is reachable only by the user who booted the snapshot") from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise UsageError(f"{path}: no booted snapshot listens there",
                         hint="is `vmloader snapshot boot ID --forward PORT` still running?") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot connect: {exc.strerror}") from None


def bridge(sock: socket.socket, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Copy stdin to the socket (then half-close it) and the socket to stdout, until the far end closes."""
    def up() -> None:
        try:
            while True:
                data = os.read(stdin.fileno(), 65536)
                if not data:
                    break
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    threading.Thread(target=up, daemon=True).start()
    out = stdout.fileno()
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            _write_all(out, data)
    except OSError:
        return
    finally:
        sock.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def socket_for(info: dict, guest_port: int) -> Optional[Path]:
    """The socket of a booted snapshot's forward to `guest_port` (from its booted.json)."""
    for entry in info.get("forwards") or ():
        if entry.get("guest_port") == guest_port and entry.get("socket"):
            return Path(entry["socket"])
    return None

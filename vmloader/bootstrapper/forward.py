"""Port forwarding into a guest over the agent channel: the guest needs no network
and nothing listens on the host beyond the loopback ports asked for."""
import socket
import threading
from dataclasses import dataclass
from typing import List

from .agentclient import AgentClient
from .errors import UsageError, VMLoaderError


@dataclass(frozen=True)
class Forward:
    host_port: int          # 0: any free port (reported once listening)
    guest_port: int
    bind: str = "127.0.0.1"

    def describe(self) -> str:
        return f"{self.bind}:{self.host_port} -> guest port {self.guest_port}"


def parse_forward(text: str) -> Forward:
    """HOST:GUEST ports, e.g. 8080:80 (HOST 0 picks a free port)."""
    host, sep, guest = text.partition(":")
    if not sep or not host.isdigit() or not guest.isdigit() or not (0 <= int(host) < 65536) \
            or not (0 < int(guest) < 65536):
        raise UsageError(f"--forward {text!r}: expected HOST_PORT:GUEST_PORT",
                         hint="e.g. --forward 8080:80 (host port 0 picks a free one)")
    return Forward(int(host), int(guest))


class Forwarder:
    """Listens on one loopback port; each connection becomes a stream to the guest port."""

    def __init__(self, client: AgentClient, forward: Forward):
        self.client = client
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((forward.bind, forward.host_port))
        except OSError as exc:
            self.listener.close()
            raise UsageError(f"--forward {forward.host_port}:{forward.guest_port}: cannot listen on "
                             f"{forward.bind}:{forward.host_port}: {exc.strerror}",
                             hint="choose another host port (0 picks a free one)") from None
        self.listener.listen(16)
        self.forward = Forward(self.listener.getsockname()[1], forward.guest_port, forward.bind)
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
            conn.close()
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
            conn.close()

    def close(self) -> None:
        self.listener.close()


def start_all(client: AgentClient, forwards: List[Forward]) -> List[Forwarder]:
    started: List[Forwarder] = []
    try:
        for forward in forwards:
            started.append(Forwarder(client, forward))
    except VMLoaderError:
        for forwarder in started:
            forwarder.close()
        raise
    return started

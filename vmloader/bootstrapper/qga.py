"""A client for the QEMU guest agent (qemu-ga) on its virtio-serial channel.

Only what agent delivery needs: guest-sync-delimited (find a clean reply
boundary), guest-file-open/write/close, guest-exec and guest-exec-status.

The guest is hostile: every reply is bounded in size (MAX_REPLY bytes per
line) and in time (each request has a deadline), and parsed as JSON only.
"""
import base64
import json
import secrets
import socket
import time
from typing import Optional

from .errors import AgentError

MAX_REPLY = 256 * 1024           # a guest-exec-status with captured output is the largest we ask for
WRITE_CHUNK = 48 * 1024          # bytes per guest-file-write (base64 in one JSON line)
SYNC_MARK = b"\xff"              # qemu-ga puts it before the reply to guest-sync-delimited
SEND_TIMEOUT = 2.0
DISABLED = "has been disabled"   # qemu-ga's refusal of an RPC its configuration blocks
ALIVE_WAIT = 20.0              # how long a qemu-ga that answered earlier requests may take for ours


class QGAError(AgentError):
    """The guest agent answered with an error, or not within bounds."""


class QGAClient:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    @classmethod
    def connect(cls, path: str) -> "QGAClient":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    # -- wire ---------------------------------------------------------------
    def _send(self, command: str, arguments: Optional[dict] = None, prefix: bytes = b"") -> None:
        message: dict = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self.sock.settimeout(SEND_TIMEOUT)    # QEMU stops reading while no qemu-ga has the port open
        try:
            self.sock.sendall(prefix + json.dumps(message).encode() + b"\n")
        except OSError as exc:                # socket.timeout included: never mistaken for a host failure
            raise QGAError(f"cannot send to the QEMU guest agent: {exc}") from None

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QGAError("the QEMU guest agent did not answer in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise QGAError("the QEMU guest agent did not answer in time") from None
        except OSError as exc:
            raise QGAError(f"the QEMU guest agent's channel failed: {exc}") from None
        if not data:
            raise QGAError("the QEMU guest agent's channel closed")
        self.buffer += data

    def _line(self, deadline: float) -> bytes:
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_REPLY:
                raise QGAError(f"the QEMU guest agent sent a reply longer than {MAX_REPLY} bytes")
            self._fill(deadline)
        line, _, self.buffer = self.buffer.partition(b"\n")
        if len(line) > MAX_REPLY:
            raise QGAError(f"the QEMU guest agent sent a reply longer than {MAX_REPLY} bytes")
        return line

    def _reply(self, deadline: float):
        while True:
            line = self._line(deadline).strip().lstrip(SYNC_MARK)
            if not line:
                continue
            try:
                reply = json.loads(line)
            except ValueError:
                raise QGAError("the QEMU guest agent sent a reply that is not JSON") from None
            if not isinstance(reply, dict):
                raise QGAError("the QEMU guest agent sent a reply that is not a JSON object")
            if "error" in reply:
                error = reply["error"] if isinstance(reply["error"], dict) else {}
                raise QGAError(f"the QEMU guest agent refused: {str(error.get('desc', '?'))[:200]}")
            if "return" in reply:
                return reply["return"]
            # events or anything else: not an answer, keep reading

    def call(self, command: str, arguments: Optional[dict] = None, timeout: float = 10.0):
        self._send(command, arguments)
        try:
            return self._reply(time.monotonic() + timeout)
        except QGAError as exc:
            if DISABLED not in exc.message:
                raise
            # qemu-ga's own words ("Command guest-exec has been disabled") do not say why or where
            raise QGAError(f"{command} is disabled in the guest's qemu-ga by its configuration (block-rpcs "
                           f"or allow-rpcs in /etc/qemu/qemu-ga.conf, or its --block-rpcs option): "
                           f"{exc.message}") from None

    # -- commands -----------------------------------------------------------
    def sync(self, timeout: float = 2.0, catching_up: float = ALIVE_WAIT) -> None:
        """Discard whatever an earlier client left unread; raises QGAError when nobody answers.

        Requests sent while no qemu-ga had the port open wait in the channel, and a qemu-ga that
        has just started answers them all, in order, before this one: a reply to an earlier sync
        says it is there, so the wait for ours grows to `catching_up` seconds (from the start,
        bounded) instead of giving up and sending yet another sync behind the backlog."""
        token = secrets.randbelow(2 ** 31)
        started = time.monotonic()
        deadline = started + timeout
        self.buffer = b""
        self._send("guest-sync-delimited", {"id": token}, prefix=SYNC_MARK)
        while True:
            line = self._line(deadline)
            mark = line.rfind(SYNC_MARK)
            try:
                reply = json.loads(line[mark + 1:])
            except ValueError:
                continue
            if not isinstance(reply, dict) or "return" not in reply:
                continue
            if reply["return"] == token:
                return
            deadline = max(deadline, started + catching_up)     # qemu-ga is there, still catching up

    def write_file(self, path: str, data: bytes, timeout: float = 30.0) -> None:
        handle = self.call("guest-file-open", {"path": path, "mode": "w"}, timeout)
        if not isinstance(handle, int) or isinstance(handle, bool):
            raise QGAError("the QEMU guest agent gave no file handle")
        try:
            for start in range(0, len(data), WRITE_CHUNK):
                chunk = data[start:start + WRITE_CHUNK]
                reply = self.call("guest-file-write",
                                  {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()}, timeout)
                if not isinstance(reply, dict) or reply.get("count") != len(chunk):
                    raise QGAError(f"the QEMU guest agent wrote a short block to {path}")
        finally:
            self.call("guest-file-close", {"handle": handle}, timeout)

    def exec(self, path: str, args: list, timeout: float = 60.0) -> tuple:
        """Run a program in the guest to its end: (exit code, stdout, stderr), outputs bounded."""
        deadline = time.monotonic() + timeout
        started = self.call("guest-exec", {"path": path, "arg": list(args), "capture-output": True}, timeout)
        pid = started.get("pid") if isinstance(started, dict) else None
        if not isinstance(pid, int):
            raise QGAError("the QEMU guest agent's guest-exec gave no pid")
        while True:
            status = self.call("guest-exec-status", {"pid": pid}, max(1.0, deadline - time.monotonic()))
            if not isinstance(status, dict):
                raise QGAError("the QEMU guest agent's guest-exec-status is not an object")
            if status.get("exited"):
                code = status.get("exitcode")
                return (code if isinstance(code, int) else -1,
                        _b64(status.get("out-data")), _b64(status.get("err-data")))
            if time.monotonic() > deadline:
                raise QGAError(f"{path} did not finish within {timeout:.0f} s in the guest")
            time.sleep(0.2)


def _b64(value) -> bytes:
    if not isinstance(value, str):
        return b""
    try:
        return base64.b64decode(value[:MAX_REPLY], validate=False)
    except ValueError:
        return b""

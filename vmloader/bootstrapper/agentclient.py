"""Host side of the agent protocol: one client per job VM.

A reader thread validates every frame (size, checksum, type, request id)
and hands it to whoever waits for that request; heartbeats prove the guest is
alive. Everything the guest sends is treated as hostile: bounded in size,
never trusted for host paths.
"""
import os
import queue
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Optional, Protocol, TypeVar, overload

from .. import protocol as P
from .errors import AgentError, GuestTimeout
from .guesttext import cap, escape

QUEUE_FRAMES = 64           # per request: at most this many frames buffered (~4 MiB)
KILL_DRAIN = 10.0           # after a timeout, the command is killed again every this many seconds,
KILLS = 6                   # at most this many times, until its EXIT comes
TRANSFER_IDLE = 120.0       # a file copy that sends nothing for this long is abandoned
SEND_STALL = 120.0          # a guest that takes none of what we send for this long has stopped reading
GUEST_TEXT_MAX = 1024       # bytes of guest-written text (an agent's error message) kept in a message


def guest_text(value: object) -> str:
    """Text the guest chose, made fit for a message: control characters escaped, length capped."""
    return cap(escape(str(value)[:GUEST_TEXT_MAX]), GUEST_TEXT_MAX)


M = TypeVar("M", bound=P.Message)


def parse(kind: type[M], frame: P.Frame) -> M:
    """The message a frame of the agent carries; AgentError (the guest's text escaped) if malformed."""
    try:
        return kind.from_payload(frame.payload)
    except P.ProtocolError as exc:
        raise AgentError(f"the guest agent sent a malformed message: {guest_text(exc)}",
                         hint="the guest's agent is damaged or not vmloader's; see the console log") from None


class ByteSink(Protocol):
    """Where a command's output goes: a binary stream, or one wrapped (job.TailWriter)."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> None: ...


@dataclass(frozen=True)
class ExecResult:
    exit_code: Optional[int]
    signal: Optional[int]
    error: Optional[str]
    message: str = ""


@dataclass(frozen=True)
class PtySpec:
    """Ask the agent for a pseudo-terminal of this size for the command."""
    rows: int = 24
    cols: int = 80
    term: str = "xterm"


class ExecTimeout(AgentError):
    """The command ran past its deadline and was killed."""
    timed_out = True


class _Closed:
    """Queued to wake waiters when the channel failed (or the agent restarted)."""

    def __init__(self, reason: Optional[str] = None):
        self.reason = reason


class AgentClient:
    def __init__(self, sock: socket.socket, *, heartbeat_timeout: float = 10.0,
                 max_file_bytes: int = 2 ** 34):
        self.sock = sock
        self.heartbeat_timeout = heartbeat_timeout
        self.max_file_bytes = max_file_bytes
        self.reader = P.FrameReader(sock.recv)
        self.info: Optional[P.Hello] = None
        self._send_lock = threading.Lock()
        self._waiters: dict = {}
        self._waiters_lock = threading.Lock()
        self._hello = threading.Event()
        self._failure: Optional[str] = None
        self._last_seen = time.monotonic()
        self._reader_blocked = False
        self._next_id = 1
        self._thread = threading.Thread(target=self._read_loop, name="agent-reader", daemon=True)
        self._thread.start()

    # -- plumbing ----------------------------------------------------------
    def _send(self, type_: int, request_id: int, payload: bytes = b"") -> None:
        """Send one frame. QEMU stops reading the channel while nothing in the guest has the port
        open, so a send can wait for ever: it gives up (AgentError) once the guest has taken
        nothing for SEND_STALL seconds, or the channel failed meanwhile."""
        data = memoryview(P.encode(type_, request_id, payload))
        try:
            with self._send_lock:
                stalled_since = time.monotonic()
                while data:
                    try:
                        sent = self.sock.send(data, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        if self._failure:
                            raise AgentError(self._failure) from None
                        if time.monotonic() - stalled_since > SEND_STALL:
                            raise AgentError(f"the guest agent took nothing we sent for {SEND_STALL:.0f} s",
                                             hint="the guest may have hung; see its console log") from None
                        self._writable(1.0)
                        continue
                    data, stalled_since = data[sent:], time.monotonic()
        except OSError as exc:
            raise AgentError(f"lost the connection to the guest agent: {exc}") from None

    def _writable(self, timeout: float) -> bool:
        poller = select.poll()              # not select(): a busy process may have fds past 1024
        poller.register(self.sock, select.POLLOUT)
        return bool(poller.poll(timeout * 1000))

    def _can_send(self) -> bool:
        """Room in the channel now (a guest whose agent is not up yet takes nothing)."""
        return self._writable(0)

    def _send_message(self, request_id: int, message: P.Message) -> None:
        self._send(message.TYPE, request_id, message.to_payload())

    def _new_request(self) -> tuple:
        with self._waiters_lock:
            request_id, self._next_id = self._next_id, self._next_id + 1
            waiter: queue.Queue = queue.Queue(maxsize=QUEUE_FRAMES)
            self._waiters[request_id] = waiter
        return request_id, waiter

    def _done(self, request_id: int) -> None:
        with self._waiters_lock:
            waiter = self._waiters.pop(request_id, None)
        while waiter is not None:       # frees the reader if it waits to put into this full queue
            try:
                waiter.get_nowait()
            except queue.Empty:
                break

    def _read_loop(self) -> None:
        try:
            while True:
                frame = self.reader.read_frame(resync=not self._hello.is_set())
                self._last_seen = time.monotonic()
                self._dispatch(frame)
        except P.ChannelClosed:
            self._fail("the guest agent closed the channel (the VM stopped or the agent died)")
        except P.ProtocolError as exc:
            self._fail(f"the guest agent broke the protocol: {guest_text(exc)}")
        except OSError as exc:
            self._fail(f"reading from the guest agent failed: {exc}")

    def _dispatch(self, frame: P.Frame) -> None:
        if frame.type == P.HEARTBEAT:
            return
        if frame.type == P.HELLO:
            info = P.Hello.from_payload(frame.payload)
            if self._hello.is_set() and self.info and info.pid != self.info.pid:
                # The guest's init restarts a dead agent; what the old one was running is lost.
                self.info = info
                # Not a permanent failure: the new agent can still sync and power off.
                self._wake_all("the guest agent restarted (it died or was killed in the guest); "
                               "the running request was lost")
                return
            self.info = info
            self._adopt_busy(info)
            self._hello.set()
            return
        with self._waiters_lock:
            waiter = self._waiters.get(frame.request_id)
        if waiter is None:
            if 0 < frame.request_id < self._next_id:
                return       # the tail of a request we already finished or aborted
            raise P.ProtocolError(f"{P.name_of(frame.type)} frame for unknown request {frame.request_id}")
        self._reader_blocked = True        # a slow consumer is not a dead guest
        try:
            waiter.put(frame)
        finally:
            self._reader_blocked = False
            self._last_seen = time.monotonic()

    def _adopt_busy(self, info: P.Hello) -> None:
        """A resumed VM's agent may still run requests of its earlier host: ignore their
        frames and number ours past them."""
        busy = [r for r in info.busy if r > 0]
        if busy:
            with self._waiters_lock:
                self._next_id = max(self._next_id, max(busy) + 1)

    def _fail(self, why: str) -> None:
        self._failure = self._failure or why
        self._wake_all(None)

    def _wake_all(self, reason: Optional[str]) -> None:
        with self._waiters_lock:
            waiters = list(self._waiters.values())
        for waiter in waiters:
            try:
                waiter.put_nowait(_Closed(reason))
            except queue.Full:
                pass

    def _check_alive(self) -> None:
        if self._failure:
            raise AgentError(self._failure)
        silent = time.monotonic() - self._last_seen
        if silent > self.heartbeat_timeout and not self._reader_blocked:
            raise AgentError(f"the guest stopped responding (no heartbeat for {silent:.1f} s)",
                             hint="the guest may have hung or crashed; see its console log")

    @overload
    def _next(self, waiter: queue.Queue) -> P.Frame: ...
    @overload
    def _next(self, waiter: queue.Queue, deadline: Optional[float]) -> Optional[P.Frame]: ...

    def _next(self, waiter: queue.Queue, deadline: Optional[float] = None) -> Optional[P.Frame]:
        """The next frame for a request; None when `deadline` (monotonic) passes."""
        while True:
            self._check_alive()
            if deadline is not None and time.monotonic() >= deadline:
                return None
            try:
                item = waiter.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, _Closed):
                raise AgentError(item.reason or self._failure or "the guest agent went away",
                                 hint="see the console log; the job's state is kept per --snapshot")
            if item.type == P.ERROR:
                raise AgentError("the guest agent refused a request: "
                                 + guest_text(parse(P.Error, item).message))
            return item

    # -- API -----------------------------------------------------------------
    def abort(self, why: str) -> None:
        """Fail every request waiting on the guest (and every later one) with AgentError(why)."""
        self._fail(why)

    def check_alive(self) -> None:
        """AgentError when the channel failed or the guest stopped sending heartbeats."""
        self._check_alive()

    def handshake(self, timeout: float) -> P.Hello:
        """Wait for the agent's HELLO (asking for it every second); returns its info."""
        deadline = time.monotonic() + timeout
        while not self._hello.is_set():
            if self._failure:
                raise AgentError(self._failure)
            if time.monotonic() >= deadline:
                raise GuestTimeout(f"no answer from the guest agent within {timeout:.0f} s")
            if self._can_send():        # else no agent reads yet: asking again would fill the channel
                self._send_message(0, P.HelloRequest(P.PROTOCOL_VERSION))
            self._hello.wait(1.0)
        info = self.info
        if info is None:        # _dispatch sets info before _hello: a bug if ever seen
            raise AgentError("the guest agent's HELLO carried no information")
        if info.protocol != P.PROTOCOL_VERSION:
            raise AgentError(f"the guest agent speaks protocol {info.protocol}, "
                             f"this host {P.PROTOCOL_VERSION}", hint="rebuild the image with this vmloader")
        self._last_seen = time.monotonic()
        return info

    def put_file(self, local_path: str, guest_path: str, *, mode: int = 0o644, user: str = "vmloader") -> None:
        request_id, waiter = self._new_request()
        try:
            size = os.path.getsize(local_path)
            self._send_message(request_id, P.Put(guest_path, mode=mode, size=size, user=user))
            with open(local_path, "rb") as handle:
                for block in iter(lambda: handle.read(P.DATA_CHUNK), b""):
                    self._check_alive()
                    self._send(P.PUT_DATA, request_id, block)
            self._send_message(request_id, P.PutEnd())
            reply = self._next(waiter)
            if reply.type != P.OK:
                raise AgentError(f"unexpected {P.name_of(reply.type)} reply to a file upload")
            parse(P.PutDone, reply)
        finally:
            self._done(request_id)

    def get_file(self, guest_path: str, dest_dir: str, *, max_bytes: Optional[int] = None) -> str:
        limit = self.max_file_bytes if max_bytes is None else max_bytes
        dest = safe_destination(dest_dir, guest_path)
        request_id, waiter = self._new_request()
        tmp = dest.with_name(dest.name + ".vmloader-part")
        try:
            self._send_message(request_id, P.Get(guest_path))
            self._receive_file(request_id, waiter, tmp, limit, guest_path)
            os.replace(tmp, dest)
            return str(dest)
        finally:
            tmp.unlink(missing_ok=True)
            self._done(request_id)

    def _receive_file(self, request_id: int, waiter: queue.Queue, tmp: Path, limit: int, name: str) -> int:
        received = 0
        with open(tmp, "xb") as out:
            while True:
                frame = self._next(waiter, time.monotonic() + TRANSFER_IDLE)
                if frame is None:
                    self._send_message(request_id, P.Kill(int(signal.SIGKILL)))
                    raise AgentError(f"{guest_text(name)}: no data from the guest for {TRANSFER_IDLE:.0f} s; "
                                     "transfer aborted")
                if frame.type == P.GET_END:
                    parse(P.GetEnd, frame)
                    return received
                if frame.type != P.GET_DATA:
                    raise AgentError(f"unexpected {P.name_of(frame.type)} frame in a file transfer")
                received += len(frame.payload)
                if received > limit:
                    self._send_message(request_id, P.Kill(int(signal.SIGKILL)))
                    raise AgentError(f"{guest_text(name)}: the guest sent more than the {limit} byte limit; "
                                     "transfer aborted")
                out.write(frame.payload)

    def supports(self, feature: str) -> bool:
        return self.info is not None and feature in self.info.features

    def exec(self, argv: Optional[list], *, env: dict, user: str, cwd: Optional[str] = None,
             stdin: Optional[BinaryIO], stdout: ByteSink, stderr: ByteSink,
             deadline: Optional[float] = None, kill_on_timeout: bool = True,
             pty: Optional[PtySpec] = None, on_start=None) -> ExecResult:
        """Run a command (argv None: the user's login shell). With `pty`, it gets a terminal
        and `on_start(request_id)` is called so window size changes can follow (resize()).
        Past `deadline` it is killed, or with kill_on_timeout=False left running (for a
        memory snapshot) and ExecTimeout raised at once."""
        if pty is not None and not self.supports("pty"):
            raise AgentError("this guest's agent has no terminal support (an image built by an older vmloader)",
                             hint="rebuild the image (vmloader images build NAME), or use `snapshot exec`")
        request_id, waiter = self._new_request()
        finished = threading.Event()
        terminal = P.Terminal(pty.rows, pty.cols, pty.term) if pty is not None else None
        request = P.Exec(list(argv) if argv else None, env, user, cwd=cwd, shell=not argv, pty=terminal)
        try:
            self._send_message(request_id, request)
            if on_start is not None:
                on_start(request_id)
            self._feed_stdin(request_id, stdin, finished)
            return self._exec_loop(request_id, waiter, stdout, stderr, deadline, kill_on_timeout)
        finally:
            finished.set()
            self._done(request_id)

    def resize(self, request_id: int, rows: int, cols: int) -> None:
        self._send_message(request_id, P.Resize(rows, cols))

    def connect(self, port: int, timeout: float = 15.0) -> "GuestStream":
        """A TCP connection to the guest's 127.0.0.1:port, relayed over the channel."""
        if not self.supports("connect"):
            raise AgentError("this guest's agent cannot forward ports (an image built by an older vmloader)",
                             hint="rebuild the image (vmloader images build NAME)")
        request_id, waiter = self._new_request()
        self._send_message(request_id, P.Connect(port))
        return GuestStream(self, request_id, waiter)

    def _exec_loop(self, request_id, waiter, stdout, stderr, deadline, kill_on_timeout=True) -> ExecResult:
        sinks = {P.STDOUT: stdout, P.STDERR: stderr}
        timed_out, kills = False, 0
        while True:
            frame = self._next(waiter, deadline)
            if frame is None and not kill_on_timeout:
                raise ExecTimeout("the command ran past its --timeout (left running for a memory snapshot)",
                                  phase="exec")
            if frame is None and kills == KILLS:
                raise ExecTimeout(f"the command ran past its --timeout and did not end within "
                                  f"{KILLS * KILL_DRAIN:.0f} s of being killed", phase="exec")
            if frame is None:
                self._send_message(request_id, P.Kill(int(signal.SIGKILL)))
                timed_out, deadline, kills = True, time.monotonic() + KILL_DRAIN, kills + 1
                continue
            if frame.type in sinks:
                sinks[frame.type].write(frame.payload)
                sinks[frame.type].flush()
            elif frame.type == P.EXIT:
                if timed_out:
                    raise ExecTimeout("the command ran past its --timeout and was killed", phase="exec")
                result = parse(P.Exit, frame)
                return ExecResult(result.code, result.signal, result.error, guest_text(result.message or ""))
            else:
                raise AgentError(f"unexpected {P.name_of(frame.type)} frame during exec")

    def _feed_stdin(self, request_id: int, stdin: Optional[BinaryIO], finished: threading.Event) -> None:
        if stdin is None:
            self._send_message(request_id, P.StdinEof())
            return

        def pump() -> None:
            try:
                fd = stdin.fileno()
                read = lambda: os.read(fd, P.DATA_CHUNK)
            except (OSError, ValueError, AttributeError):
                read = lambda: stdin.read(P.DATA_CHUNK)
            try:
                while not finished.is_set():
                    data = read()
                    if finished.is_set():
                        return
                    if not data:
                        self._send_message(request_id, P.StdinEof())
                        return
                    self._send(P.STDIN, request_id, data)
            except (OSError, AgentError):
                return
        threading.Thread(target=pump, name="agent-stdin", daemon=True).start()

    def list_dir(self, guest_path: str, timeout: float = 30.0) -> list[P.DirEntry]:
        """Entries of a guest directory: name, type (file/dir/link/other), size, mtime_ns."""
        request_id, waiter = self._new_request()
        try:
            self._send_message(request_id, P.ListDir(guest_path))
            reply = self._next(waiter, time.monotonic() + timeout)
            if reply is None:
                raise AgentError(f"the guest agent did not list {guest_path} within {timeout:.0f} s",
                                 hint="an image built by an older vmloader cannot list directories: rebuild it "
                                      "(vmloader images build NAME) or name the outputs explicitly")
            return parse(P.Listing, reply).entries
        finally:
            self._done(request_id)

    def identity(self, entropy: bytes, hostname: str, machine_id: str, time_ns: int,
                 timeout: float = 20.0) -> None:
        """Make the guest its own machine (see agent/server.py Identity); AgentError if it could not."""
        request_id, waiter = self._new_request()
        try:
            self._send_message(request_id, P.Identity(entropy, hostname, machine_id, time_ns))
            reply = self._next(waiter, time.monotonic() + timeout)
            if reply is None:
                raise AgentError(f"the guest agent did not confirm its new identity within {timeout:.0f} s")
        finally:
            self._done(request_id)

    def shutdown(self, timeout: float = 10.0) -> None:
        request_id, waiter = self._new_request()
        try:
            self._send_message(request_id, P.Shutdown())
            reply = self._next(waiter, time.monotonic() + timeout)
            if reply is None:
                raise AgentError("the guest agent did not acknowledge shutdown")
        finally:
            self._done(request_id)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class GuestStream:
    """One relayed TCP connection (see AgentClient.connect)."""

    def __init__(self, client: AgentClient, request_id: int, waiter: queue.Queue):
        self.client = client
        self.request_id = request_id
        self.waiter = waiter
        self.ended = False

    def send(self, data: bytes) -> None:
        for start in range(0, len(data), P.DATA_CHUNK):
            self.client._send(P.STDIN, self.request_id, data[start:start + P.DATA_CHUNK])

    def send_eof(self) -> None:
        self.client._send_message(self.request_id, P.StdinEof())

    def recv(self) -> bytes:
        """The next bytes from the guest side; b"" once it closed. AgentError if it never connected."""
        if self.ended:
            return b""
        frame = self.client._next(self.waiter)
        if frame.type == P.STDOUT:
            return frame.payload
        self.ended = True
        end = parse(P.Exit, frame) if frame.type == P.EXIT else None
        if end is not None and end.error:
            raise AgentError(f"cannot connect to {guest_text(end.message or '')}",
                             hint="is anything listening on that port in the guest?")
        return b""

    def close(self) -> None:
        if not self.ended:
            try:
                self.client._send_message(self.request_id, P.Kill(int(signal.SIGKILL)))
            except AgentError:
                pass
        self.client._done(self.request_id)


def safe_destination(dest_dir: str, guest_path: str) -> Path:
    """Where a guest file may land: inside dest_dir, through no symlink, never absolute."""
    pure = PurePosixPath(guest_path)
    if pure.is_absolute() or not pure.parts or any(p in ("..", ".", "") for p in pure.parts):
        raise AgentError(f"refusing to copy back '{guest_text(guest_path)}': only plain relative paths "
                         "are allowed")
    root = Path(dest_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    current = root
    for part in pure.parts[:-1]:
        current = current / part
        if current.is_symlink():
            raise AgentError(f"refusing to copy back '{guest_text(guest_path)}': {current} is a symlink")
        current.mkdir(exist_ok=True)
    dest = current / pure.parts[-1]
    if dest.is_symlink():
        raise AgentError(f"refusing to copy back '{guest_text(guest_path)}': {dest} is a symlink")
    return dest

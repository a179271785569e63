"""The host <-> agent wire protocol, shared by both sides.

Stdlib only, Python 3.6 syntax, no I/O of its own: callers pass a `read(n)`
function (returning b"" at end of stream) and write the bytes `encode()`
returns.

Frame: 16-byte header, then `length` bytes of payload.

    magic  b"VL"   2 bytes
    version        1 byte   (PROTOCOL_VERSION)
    type           1 byte   (one of the constants below)
    request id     4 bytes  (0 for unsolicited frames: HELLO, HEARTBEAT)
    length         4 bytes  (payload size, at most the reader's limit)
    crc32          4 bytes  (over the first 12 header bytes and the payload)

Control payloads are UTF-8 JSON objects, each one a message class below
(`to_payload()` / `from_payload()`: the only place a field name is spelled);
data payloads (STDIN, STDOUT, STDERR, PUT_DATA, GET_DATA) are raw bytes.
Parsing is strict about what it needs (a missing field or a wrong type is a
ProtocolError naming the field) and ignores fields it does not know, so an
older or newer peer still talks to this one. Fields added after the first
release are optional with a default.

An agent serves every port named CHANNEL_PREFIX + N: port 0 belongs to the
job's vmloader, the others let a second client (an interactive shell into a
booted snapshot) attach while the first stays connected.
"""
import json
import struct
import zlib

MYPY = False
if MYPY:        # types for the checker only: importing typing costs a guest boot ~0.1 s under TCG
    from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

MAGIC = b"VL"
PROTOCOL_VERSION = 1
HEADER = struct.Struct(">2sBBIII")
MAX_PAYLOAD = 1 << 20          # no frame larger than this is ever read into memory
DATA_CHUNK = 64 * 1024         # data frames carry at most this much
CHANNEL_PREFIX = "org.vmloader.agent."
CHANNEL_NAME = CHANNEL_PREFIX + "0"
ATTACH_PORTS = 2             # ports 1..ATTACH_PORTS beside the job's own port 0
FEATURES = ("list", "pty", "connect", "identity")   # announced in HELLO; hosts check before asking

HELLO = 1
HEARTBEAT = 3
EXEC = 10
STDIN = 11
STDIN_EOF = 12
STDOUT = 13
STDERR = 14
EXIT = 15
KILL = 16
RESIZE = 17        # a pty exec's window changed: {"rows": R, "cols": C}
CONNECT = 18       # open a TCP stream to the guest's 127.0.0.1:{"port": P}; data as STDIN/STDOUT, end as EXIT
PUT = 20
PUT_DATA = 21
PUT_END = 22
GET = 23
GET_DATA = 24
GET_END = 25
LIST = 26          # list a directory: reply OK {"entries": [{name, type, size, mtime_ns}]}
IDENTITY = 27      # make this VM its own machine: {"entropy": hex, "hostname", "machine_id", "time_ns"}
OK = 30
ERROR = 31
SHUTDOWN = 40

NAMES = {value: name for name, value in globals().items()
         if name.isupper() and isinstance(value, int) and 0 < value < 64
         and name not in ("PROTOCOL_VERSION", "ATTACH_PORTS")}
DATA_TYPES = frozenset((STDIN, STDOUT, STDERR, PUT_DATA, GET_DATA))


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


class ChannelClosed(ProtocolError):
    """The stream ended (cleanly between frames, or in the middle of one)."""


class Frame(object):
    __slots__ = ("type", "request_id", "payload")

    def __init__(self, type_, request_id, payload=b""):
        self.type = type_
        self.request_id = request_id
        self.payload = payload

    def json(self):
        """The payload as a JSON object; ProtocolError if it is not one."""
        try:
            value = json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError("%s frame has a malformed JSON payload: %s" % (name_of(self.type), exc))
        if not isinstance(value, dict):
            raise ProtocolError("%s frame payload is not a JSON object" % name_of(self.type))
        return value

    def __repr__(self):
        return "Frame(%s, %d, %d bytes)" % (name_of(self.type), self.request_id, len(self.payload))


def name_of(type_):
    return NAMES.get(type_, "type %d" % type_)


def encode(type_, request_id, payload=b""):
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload of %d bytes exceeds the %d byte frame limit" % (len(payload), MAX_PAYLOAD))
    head = HEADER.pack(MAGIC, PROTOCOL_VERSION, type_, request_id, len(payload), 0)[:12]
    crc = zlib.crc32(payload, zlib.crc32(head)) & 0xFFFFFFFF
    return head + struct.pack(">I", crc) + payload


def encode_json(type_, request_id, obj):
    return encode(type_, request_id, json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def _read_exact(read, size, started):
    chunks = []
    remaining = size
    while remaining:
        chunk = read(remaining)
        if not chunk:
            if started or chunks:
                raise ChannelClosed("the stream ended in the middle of a frame")
            raise ChannelClosed("the stream ended")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class FrameReader(object):
    """Reads frames from `read(n)`, validating everything before trusting it.

    `resync=True` skips garbage before a frame's magic (at most `max_skip`
    bytes) instead of failing: used while waiting for the first HELLO, when a
    previous connection may have left partial bytes in the channel.
    """

    def __init__(self, read, max_payload=MAX_PAYLOAD, known_types=None):
        self._read = read
        self.max_payload = max_payload
        self.known_types = frozenset(NAMES) if known_types is None else known_types
        self.skipped = 0

    def read_frame(self, resync=False, max_skip=1 << 16):
        head = _read_exact(self._read, HEADER.size, False)
        while head[:2] != MAGIC:
            if not resync or self.skipped >= max_skip:
                raise ProtocolError("bad frame magic %r" % head[:2])
            self.skipped += 1
            head = head[1:] + _read_exact(self._read, 1, True)
        magic, version, type_, request_id, length, crc = HEADER.unpack(head)
        if version != PROTOCOL_VERSION:
            raise ProtocolError("unsupported protocol version %d (this side speaks %d)"
                                % (version, PROTOCOL_VERSION))
        if length > self.max_payload:
            raise ProtocolError("frame of %d bytes exceeds the %d byte limit" % (length, self.max_payload))
        payload = _read_exact(self._read, length, True) if length else b""
        if zlib.crc32(payload, zlib.crc32(head[:12])) & 0xFFFFFFFF != crc:
            raise ProtocolError("frame checksum mismatch (%s)" % name_of(type_))
        if type_ not in self.known_types:
            raise ProtocolError("unknown frame type %d" % type_)
        return Frame(type_, request_id, payload)


# -- messages ----------------------------------------------------------------
# One class per control payload. Serialized as json.dumps does by default (", " and ": "
# separators, ASCII escapes, fields in the order below, optional ones left out while unset):
# byte for byte what both sides sent before these classes existed.

_EXCERPT = 120      # characters of a bad value quoted in a ProtocolError (the host escapes them)


def _kind(value):
    # type: (Any) -> str
    return "null" if value is None else type(value).__name__


class _Fields(object):
    """Typed access to one decoded JSON object; every refusal names the message and the field.
    A missing optional field and an explicit null are the same: unset."""
    __slots__ = ("message", "obj")

    def __init__(self, message, obj):
        # type: (str, Dict[str, Any]) -> None
        self.message = message
        self.obj = obj

    def refuse(self, name, wanted, value):
        # type: (str, str, Any) -> ProtocolError
        return ProtocolError("%s field '%s' must be %s, not %s (%s)"
                             % (self.message, name, wanted, _kind(value), str(value)[:_EXCERPT]))

    def required(self, name):
        # type: (str) -> Any
        if name not in self.obj:
            raise ProtocolError("%s is missing its field '%s'" % (self.message, name))
        return self.obj[name]

    def _checked(self, name, value, wanted, kinds):
        # type: (str, Any, str, Tuple[type, ...]) -> Any
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.refuse(name, wanted, value)
        return value

    def req_int(self, name):
        # type: (str) -> int
        return self._checked(name, self.required(name), "an integer", (int,))

    def opt_int(self, name):
        # type: (str) -> Optional[int]
        value = self.obj.get(name)
        return None if value is None else self._checked(name, value, "an integer", (int,))

    def int_or(self, name, default):
        # type: (str, int) -> int
        value = self.opt_int(name)
        return default if value is None else value

    def req_str(self, name):
        # type: (str) -> str
        return self._checked(name, self.required(name), "a string", (str,))

    def opt_str(self, name):
        # type: (str) -> Optional[str]
        value = self.obj.get(name)
        return None if value is None else self._checked(name, value, "a string", (str,))

    def str_or(self, name, default):
        # type: (str, str) -> str
        value = self.opt_str(name)
        return default if value is None else value

    def flag(self, name):
        # type: (str) -> bool
        value = self.obj.get(name)
        return False if value is None else self._checked(name, value, "true or false", (bool,))

    def opt_list(self, name, item_type):
        # type: (str, type) -> Optional[List[Any]]
        value = self.obj.get(name)
        if value is None:
            return None
        wanted = "a list of %ss" % ("integer" if item_type is int else "string")
        self._checked(name, value, wanted, (list,))
        for item in value:
            self._checked(name, item, wanted, (item_type,))
        return value

    def str_dict(self, name):
        # type: (str) -> Dict[str, str]
        value = self.obj.get(name)
        if value is None:
            return {}
        self._checked(name, value, "an object of strings", (dict,))
        for item in value.values():
            self._checked(name, item, "an object of strings", (str,))
        return value

    def opt_object(self, name):
        # type: (str) -> Optional[Dict[str, Any]]
        value = self.obj.get(name)
        return None if value is None else self._checked(name, value, "an object", (dict,))

    def req_list(self, name):
        # type: (str) -> List[Any]
        return self._checked(name, self.required(name), "a list", (list,))


def _json_object(message, payload):
    # type: (str, bytes) -> _Fields
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("%s frame has a malformed JSON payload: %s" % (message, exc))
    if not isinstance(value, dict):
        raise ProtocolError("%s frame payload is not a JSON object" % message)
    return _Fields(message, value)


def _dump(obj):
    # type: (Dict[str, Any]) -> bytes
    return json.dumps(obj).encode("utf-8")


def _without_unset(pairs):
    # type: (Sequence[Tuple[str, Any]]) -> Dict[str, Any]
    return dict((name, value) for name, value in pairs if value is not None)


if MYPY:
    M = TypeVar("M", bound="Message")


class Message(object):
    """A control message: TYPE is its frame type; equal when every field is."""
    __slots__ = ()      # type: Tuple[str, ...]
    TYPE = 0

    def to_payload(self):
        # type: () -> bytes
        raise NotImplementedError

    @classmethod
    def from_payload(cls, payload):
        # type: (Type[M], bytes) -> M
        """The message a payload carries; ProtocolError naming the field if it is malformed."""
        raise NotImplementedError

    def encode(self, request_id):
        # type: (int) -> bytes
        return encode(self.TYPE, request_id, self.to_payload())

    def __eq__(self, other):
        # type: (object) -> bool
        return type(other) is type(self) and all(
            getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __ne__(self, other):
        # type: (object) -> bool
        return not self == other

    __hash__ = None     # type: ignore[assignment]

    def __repr__(self):
        # type: () -> str
        return "%s(%s)" % (type(self).__name__,
                           ", ".join("%s=%r" % (name, getattr(self, name)) for name in self.__slots__))


class _Empty(Message):
    """A message without fields, sent as `{}`; any JSON object is accepted."""
    __slots__ = ()

    def to_payload(self):
        # type: () -> bytes
        return b"{}"

    @classmethod
    def _parse(cls, payload):
        # type: (bytes) -> None
        if payload:
            _json_object(name_of(cls.TYPE), payload)


class _Bare(Message):
    """A message whose frame carries no payload at all (bytes after the header are ignored)."""
    __slots__ = ()

    def to_payload(self):
        # type: () -> bytes
        return b""


class HelloRequest(Message):
    """Host -> agent: "say HELLO" (sent every second until the agent does)."""
    __slots__ = ("protocol",)
    TYPE = HELLO

    def __init__(self, protocol=PROTOCOL_VERSION):
        # type: (int) -> None
        self.protocol = protocol

    def to_payload(self):
        # type: () -> bytes
        return _dump({"protocol": self.protocol})

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> HelloRequest
        return cls(_json_object("HELLO", payload).req_int("protocol"))


class Hello(Message):
    """Agent -> host: who answers. `features` and `busy` came later (empty from older agents);
    `busy`: requests still running from an earlier host connection (a VM resumed from memory);
    `delivery`: how a stock image got this agent (qemu-guest-agent, cloud-init), unset for our own."""
    __slots__ = ("protocol", "agent", "python", "kernel", "hostname", "pid", "features", "busy", "delivery")
    TYPE = HELLO

    def __init__(self, protocol, agent=None, python=None, kernel=None, hostname=None, pid=None,
                 features=(), busy=(), delivery=None):
        # type: (int, Optional[str], Optional[str], Optional[str], Optional[str], Optional[int], Sequence[str], Sequence[int], Optional[str]) -> None
        self.protocol = protocol
        self.agent = agent
        self.python = python
        self.kernel = kernel
        self.hostname = hostname
        self.pid = pid
        self.features = tuple(features)
        self.busy = tuple(busy)
        self.delivery = delivery

    def to_payload(self):
        # type: () -> bytes
        obj = _without_unset([("protocol", self.protocol), ("agent", self.agent), ("python", self.python),
                              ("kernel", self.kernel), ("hostname", self.hostname), ("pid", self.pid)])
        obj.update(features=list(self.features), busy=list(self.busy))
        if self.delivery:
            obj["delivery"] = self.delivery
        return _dump(obj)

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> Hello
        f = _json_object("HELLO", payload)
        return cls(f.req_int("protocol"), f.opt_str("agent"), f.opt_str("python"), f.opt_str("kernel"),
                   f.opt_str("hostname"), f.opt_int("pid"), f.opt_list("features", str) or (),
                   f.opt_list("busy", int) or (), f.opt_str("delivery"))


class Heartbeat(_Bare):
    """Agent -> host, every second, request id 0: the guest is alive."""
    __slots__ = ()
    TYPE = HEARTBEAT

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> Heartbeat
        return cls()


class Terminal(object):
    """The pseudo-terminal an EXEC asks for."""
    __slots__ = ("rows", "cols", "term")

    def __init__(self, rows=24, cols=80, term="xterm"):
        # type: (int, int, str) -> None
        self.rows = rows
        self.cols = cols
        self.term = term

    def __eq__(self, other):
        # type: (object) -> bool
        return isinstance(other, Terminal) and (self.rows, self.cols, self.term) == (
            other.rows, other.cols, other.term)

    __hash__ = None     # type: ignore[assignment]

    def __repr__(self):
        # type: () -> str
        return "Terminal(%d, %d, %r)" % (self.rows, self.cols, self.term)

    def to_object(self):
        # type: () -> Dict[str, Any]
        return {"rows": self.rows, "cols": self.cols, "term": self.term}

    @classmethod
    def from_object(cls, obj):
        # type: (Dict[str, Any]) -> Terminal
        f = _Fields("EXEC pty", obj)
        return cls(f.int_or("rows", 0) or 24, f.int_or("cols", 0) or 80, f.str_or("term", "") or "xterm")


class Exec(Message):
    """Host -> agent: run argv (or, with shell=True and argv None, the user's login shell)
    as `user` in `cwd` (None: the agent's work dir), on a terminal when `pty` is set."""
    __slots__ = ("argv", "shell", "env", "user", "cwd", "pty")
    TYPE = EXEC

    def __init__(self, argv, env, user, cwd=None, shell=False, pty=None):
        # type: (Optional[Sequence[str]], Dict[str, str], Optional[str], Optional[str], bool, Optional[Terminal]) -> None
        self.argv = list(argv) if argv is not None else None
        self.shell = shell
        self.env = env
        self.user = user
        self.cwd = cwd
        self.pty = pty

    def to_payload(self):
        # type: () -> bytes
        obj = {"argv": self.argv, "shell": self.shell, "env": self.env, "user": self.user,
               "cwd": self.cwd}  # type: Dict[str, Any]
        if self.pty is not None:
            obj["pty"] = self.pty.to_object()
        return _dump(obj)

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> Exec
        f = _json_object("EXEC", payload)
        pty = f.opt_object("pty")
        return cls(f.opt_list("argv", str), f.str_dict("env"), f.opt_str("user"), f.opt_str("cwd"),
                   f.flag("shell"), Terminal.from_object(pty) if pty is not None else None)


class Exit(Message):
    """Agent -> host: a command ended with `code` or by `signal`, or never started (`error`:
    not_found, not_executable, spawn_failed, connect_failed; `message` says why)."""
    __slots__ = ("code", "signal", "error", "message")
    TYPE = EXIT

    def __init__(self, code=None, signal=None, error=None, message=None):
        # type: (Optional[int], Optional[int], Optional[str], Optional[str]) -> None
        self.code = code
        self.signal = signal
        self.error = error
        self.message = message

    def to_payload(self):
        # type: () -> bytes
        return _dump(_without_unset([("code", self.code), ("signal", self.signal),
                                     ("error", self.error), ("message", self.message)]))

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> Exit
        f = _json_object("EXIT", payload)
        return cls(f.opt_int("code"), f.opt_int("signal"), f.opt_str("error"), f.opt_str("message"))


class Kill(Message):
    """Host -> agent: send `signal` to a command's process group (or end a stream, stop a download)."""
    __slots__ = ("signal",)
    TYPE = KILL

    def __init__(self, signal):
        # type: (int) -> None
        self.signal = signal

    def to_payload(self):
        # type: () -> bytes
        return _dump({"signal": self.signal})

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> Kill
        return cls(_json_object("KILL", payload).req_int("signal"))


class Resize(Message):
    """Host -> agent: a pty command's window changed."""
    __slots__ = ("rows", "cols")
    TYPE = RESIZE

    def __init__(self, rows, cols):
        # type: (int, int) -> None
        self.rows = rows
        self.cols = cols

    def to_payload(self):
        # type: () -> bytes
        return _dump({"rows": self.rows, "cols": self.cols})

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> Resize
        f = _json_object("RESIZE", payload)
        return cls(f.req_int("rows"), f.req_int("cols"))


class Connect(Message):
    """Host -> agent: open a TCP stream to the guest's 127.0.0.1:port."""
    __slots__ = ("port",)
    TYPE = CONNECT

    def __init__(self, port):
        # type: (int) -> None
        self.port = port

    def to_payload(self):
        # type: () -> bytes
        return _dump({"port": self.port})

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> Connect
        return cls(_json_object("CONNECT", payload).req_int("port"))


class Put(Message):
    """Host -> agent: a file upload begins (PUT_DATA frames, then PUT_END)."""
    __slots__ = ("path", "mode", "size", "user")
    TYPE = PUT

    def __init__(self, path, mode=0o644, size=None, user=None):
        # type: (str, int, Optional[int], Optional[str]) -> None
        self.path = path
        self.mode = mode
        self.size = size
        self.user = user

    def to_payload(self):
        # type: () -> bytes
        return _dump(_without_unset([("path", self.path), ("mode", self.mode), ("size", self.size),
                                     ("user", self.user)]))

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> Put
        f = _json_object("PUT", payload)
        return cls(f.req_str("path"), f.int_or("mode", 0o644), f.opt_int("size"), f.opt_str("user"))


class PutEnd(_Bare):
    """Host -> agent: the upload's last byte was sent; the agent answers PutDone."""
    __slots__ = ()
    TYPE = PUT_END

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> PutEnd
        return cls()


class PutDone(Message):
    """Agent -> host (OK): the uploaded file is in place with `size` bytes."""
    __slots__ = ("size",)
    TYPE = OK

    def __init__(self, size):
        # type: (int) -> None
        self.size = size

    def to_payload(self):
        # type: () -> bytes
        return _dump({"size": self.size})

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> PutDone
        return cls(_json_object("OK", payload).req_int("size"))


class Get(Message):
    """Host -> agent: send a file (GET_DATA frames, then GET_END)."""
    __slots__ = ("path",)
    TYPE = GET

    def __init__(self, path):
        # type: (str) -> None
        self.path = path

    def to_payload(self):
        # type: () -> bytes
        return _dump({"path": self.path})

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> Get
        return cls(_json_object("GET", payload).req_str("path"))


class GetEnd(Message):
    """Agent -> host: the file was sent whole, `size` bytes."""
    __slots__ = ("size",)
    TYPE = GET_END

    def __init__(self, size):
        # type: (int) -> None
        self.size = size

    def to_payload(self):
        # type: () -> bytes
        return _dump({"size": self.size})

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> GetEnd
        return cls(_json_object("GET_END", payload).req_int("size"))


class ListDir(Message):
    """Host -> agent: list one directory (relative paths are in the work dir)."""
    __slots__ = ("path",)
    TYPE = LIST

    def __init__(self, path="."):
        # type: (str) -> None
        self.path = path

    def to_payload(self):
        # type: () -> bytes
        return _dump({"path": self.path})

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> ListDir
        return cls(_json_object("LIST", payload).str_or("path", "") or ".")


class DirEntry(object):
    """One name in a Listing; `type` is file, dir, link or other (not followed through symlinks)."""
    __slots__ = ("name", "type", "size", "mtime_ns")

    def __init__(self, name, type, size, mtime_ns):
        # type: (str, str, int, int) -> None
        self.name = name
        self.type = type
        self.size = size
        self.mtime_ns = mtime_ns

    def __eq__(self, other):
        # type: (object) -> bool
        return isinstance(other, DirEntry) and all(
            getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None     # type: ignore[assignment]

    def __repr__(self):
        # type: () -> str
        return "DirEntry(%r, %r, %d, %d)" % (self.name, self.type, self.size, self.mtime_ns)

    def to_object(self):
        # type: () -> Dict[str, Any]
        return {"name": self.name, "type": self.type, "size": self.size, "mtime_ns": self.mtime_ns}

    @classmethod
    def from_object(cls, obj):
        # type: (Any) -> DirEntry
        if not isinstance(obj, dict):
            raise ProtocolError("OK field 'entries' must hold objects, not %s" % _kind(obj))
        f = _Fields("OK entry", obj)
        return cls(f.req_str("name"), f.req_str("type"), f.req_int("size"), f.req_int("mtime_ns"))


class Listing(Message):
    """Agent -> host (OK): the entries of a listed directory."""
    __slots__ = ("entries",)
    TYPE = OK

    def __init__(self, entries):
        # type: (Sequence[DirEntry]) -> None
        self.entries = list(entries)

    def to_payload(self):
        # type: () -> bytes
        return _dump({"entries": [entry.to_object() for entry in self.entries]})

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> Listing
        return cls([DirEntry.from_object(entry) for entry in _json_object("OK", payload).req_list("entries")])


class Error(Message):
    """Agent -> host: a request failed; `message` is the agent's (guest-written) reason."""
    __slots__ = ("message",)
    TYPE = ERROR

    def __init__(self, message):
        # type: (str) -> None
        self.message = message

    def to_payload(self):
        # type: () -> bytes
        return _dump({"message": self.message})

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> Error
        return cls(_json_object("ERROR", payload).req_str("message"))


class Shutdown(_Empty):
    """Host -> agent: sync the disks and power off (after answering ShutdownDone)."""
    __slots__ = ()
    TYPE = SHUTDOWN

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> Shutdown
        cls._parse(payload)
        return cls()


class ShutdownDone(_Empty):
    """Agent -> host (OK): synced; the power goes next."""
    __slots__ = ()
    TYPE = OK

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> ShutdownDone
        cls._parse(payload)
        return cls()


class Identity(Message):
    """Host -> agent: make this VM its own machine (a warm start is a clone of a saved one)."""
    __slots__ = ("entropy", "hostname", "machine_id", "time_ns")
    TYPE = IDENTITY

    def __init__(self, entropy, hostname, machine_id, time_ns):
        # type: (bytes, str, str, int) -> None
        self.entropy = entropy
        self.hostname = hostname
        self.machine_id = machine_id
        self.time_ns = time_ns

    def to_payload(self):
        # type: () -> bytes
        return _dump({"entropy": self.entropy.hex(), "hostname": self.hostname,
                      "machine_id": self.machine_id, "time_ns": self.time_ns})

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> Identity
        f = _json_object("IDENTITY", payload)
        entropy = f.req_str("entropy")
        try:
            raw = bytes.fromhex(entropy)
        except ValueError:
            raise ProtocolError("IDENTITY field entropy is not hex")
        return cls(raw, f.req_str("hostname"), f.req_str("machine_id"), f.req_int("time_ns"))


class IdentityDone(Message):
    """Agent -> host (OK): the guest's hostname now."""
    __slots__ = ("hostname",)
    TYPE = OK

    def __init__(self, hostname):
        # type: (str) -> None
        self.hostname = hostname

    def to_payload(self):
        # type: () -> bytes
        return _dump({"hostname": self.hostname})

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> IdentityDone
        return cls(_json_object("OK", payload).req_str("hostname"))


class StdinEof(_Bare):
    """Host -> agent: the command's input ended."""
    __slots__ = ()
    TYPE = STDIN_EOF

    @classmethod
    def from_payload(cls, payload):
        # type: (bytes) -> StdinEof
        return cls()

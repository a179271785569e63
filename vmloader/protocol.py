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

Control payloads are UTF-8 JSON objects; data payloads (STDIN, STDOUT,
STDERR, PUT_DATA, GET_DATA) are raw bytes.

An agent serves every port named CHANNEL_PREFIX + N: port 0 belongs to the
job's vmloader, the others let a second client (an interactive shell into a
booted snapshot) attach while the first stays connected.
"""
import json
import struct
import zlib

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

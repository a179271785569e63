import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from vmloader import protocol as P


def reader_over(data: bytes, chunk: int = 1 << 20) -> P.FrameReader:
    stream = io.BytesIO(data)
    return P.FrameReader(lambda n: stream.read(min(n, chunk)))


def test_frames_round_trip_with_type_request_id_and_payload():
    data = P.encode(P.STDOUT, 7, b"\x00\xffbinary") + P.encode_json(P.EXIT, 7, {"code": 3})
    reader = reader_over(data)
    first, second = reader.read_frame(), reader.read_frame()
    assert (first.type, first.request_id, first.payload) == (P.STDOUT, 7, b"\x00\xffbinary")
    assert second.json() == {"code": 3}
    with pytest.raises(P.ChannelClosed, match="ended"):
        reader.read_frame()


def test_a_stream_that_returns_one_byte_at_a_time_still_yields_whole_frames():
    payload = bytes(range(256)) * 10
    frame = reader_over(P.encode(P.GET_DATA, 1, payload), chunk=1).read_frame()
    assert frame.payload == payload


def test_an_oversized_length_is_refused_before_reading_the_payload():
    head = struct.pack(">2sBBII", P.MAGIC, P.PROTOCOL_VERSION, P.STDOUT, 1, 1 << 31)
    asked = []
    stream = io.BytesIO(head + struct.pack(">I", 0))

    def read(n):
        asked.append(n)
        return stream.read(n)
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.FrameReader(read).read_frame()
    assert max(asked) == P.HEADER.size


def test_a_flipped_bit_fails_the_checksum():
    data = bytearray(P.encode(P.STDOUT, 1, b"hello"))
    data[-1] ^= 0x01
    with pytest.raises(P.ProtocolError, match="checksum"):
        reader_over(bytes(data)).read_frame()


def test_unknown_type_wrong_magic_and_wrong_version_are_refused():
    head = P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, 99, 1, 0, 0)[:12]
    unknown = head + struct.pack(">I", zlib.crc32(head) & 0xFFFFFFFF)
    with pytest.raises(P.ProtocolError, match="unknown frame type 99"):
        reader_over(unknown).read_frame()
    with pytest.raises(P.ProtocolError, match="magic"):
        reader_over(b"XX" + P.encode(P.OK, 1)[2:]).read_frame()
    wrong_version = bytearray(P.encode(P.OK, 1))
    wrong_version[2] = 9
    with pytest.raises(P.ProtocolError, match="version 9"):
        reader_over(bytes(wrong_version)).read_frame()


def test_a_frame_cut_off_in_the_middle_is_a_closed_channel():
    data = P.encode(P.STDOUT, 1, b"0123456789")
    with pytest.raises(P.ChannelClosed, match="middle"):
        reader_over(data[:-3]).read_frame()


def test_resync_skips_garbage_before_the_first_frame():
    reader = reader_over(b"\x00garbage-from-an-old-session" + P.encode_json(P.HELLO, 0, {"protocol": 1}))
    assert reader.read_frame(resync=True).json() == {"protocol": 1}


def test_payloads_over_the_limit_cannot_be_encoded():
    with pytest.raises(ValueError):
        P.encode(P.STDOUT, 1, b"x" * (P.MAX_PAYLOAD + 1))


def test_json_payloads_that_are_not_objects_are_protocol_errors():
    with pytest.raises(P.ProtocolError):
        P.Frame(P.EXIT, 1, b"[1, 2]").json()
    with pytest.raises(P.ProtocolError):
        P.Frame(P.EXIT, 1, b"\xff\xfe").json()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_yield_only_valid_frames_or_protocol_errors(data):
    reader = P.FrameReader(io.BytesIO(data).read, max_payload=1024)
    try:
        while True:
            frame = reader.read_frame()
            assert frame.type in P.NAMES and len(frame.payload) <= 1024
    except P.ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(P.NAMES)), st.integers(0, 2**32 - 1), st.binary(max_size=2048))
def test_every_valid_frame_survives_a_round_trip(type_, request_id, payload):
    frame = reader_over(P.encode(type_, request_id, payload), chunk=7).read_frame()
    assert (frame.type, frame.request_id, frame.payload) == (type_, request_id, payload)


def _mutated_stream():
    """Valid frames with flipped bits, truncations and junk between them: what a hostile guest sends."""
    frame = st.builds(lambda t, r, p: P.encode(t, r, p), st.integers(0, 255), st.integers(0, 2**32 - 1),
                      st.binary(max_size=300))
    junk = st.binary(max_size=40)

    def mutate(parts, flips):
        data = bytearray(b"".join(parts))
        for position, bit in flips:
            if data:
                data[position % len(data)] ^= 1 << bit
        return bytes(data)
    return st.builds(mutate, st.lists(st.one_of(frame, junk), max_size=6),
                     st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=4))


@settings(max_examples=10_000, deadline=None)
@given(_mutated_stream(), st.booleans())
def test_host_side_parsing_of_hostile_agent_streams_only_ever_raises_protocol_errors(data, resync):
    """Fuzzed with 10k examples in every run: nothing a guest sends crashes or overreads the host."""
    reader = P.FrameReader(io.BytesIO(data).read, max_payload=256)
    try:
        for _ in range(64):
            frame = reader.read_frame(resync=resync)
            assert frame.type in P.NAMES and len(frame.payload) <= 256
            if frame.type not in P.DATA_TYPES:
                try:
                    assert isinstance(frame.json(), dict)
                except P.ProtocolError:
                    pass
    except P.ProtocolError:
        pass


# -- typed messages ------------------------------------------------------------------------------

RECORDED = json.loads((Path(__file__).parent / "golden" / "protocol-v1-payloads.json").read_text())
MESSAGES = [cls for cls in vars(P).values()
            if isinstance(cls, type) and issubclass(cls, P.Message) and cls.TYPE and not cls.__name__.startswith("_")]


def recorded(kind: str) -> list:
    return [pytest.param(r, id=f"{r['from']}-{r['message']}-{n}") for n, r in enumerate(RECORDED[kind])]


@pytest.mark.parametrize("record", recorded("current"))
def test_what_the_previous_release_sent_parses_and_re_encodes_byte_for_byte(record):
    """Both directions: an old agent's replies reach a new host, and a new host's requests are the
    bytes an old agent already parses (and the other way round)."""
    cls = getattr(P, record["message"])
    payload = record["payload"].encode()
    message = cls.from_payload(payload)
    assert message.to_payload() == payload
    assert P.name_of(cls.TYPE) == record["type"]


@pytest.mark.parametrize("record", recorded("older") + recorded("empty"))
def test_shapes_older_releases_sent_still_parse(record):
    cls = getattr(P, record["message"])
    message = cls.from_payload(record["payload"].encode())
    assert cls.from_payload(message.to_payload()) == message


def test_an_agent_from_before_features_says_hello_with_none():
    old = next(r for r in RECORDED["older"] if r["message"] == "Hello")
    hello = P.Hello.from_payload(old["payload"].encode())
    assert (hello.protocol, hello.pid, hello.features, hello.busy) == (1, 301, (), ())


def test_a_host_from_before_shells_asks_for_argv_without_a_shell():
    old = next(r for r in RECORDED["older"] if r["message"] == "Exec")
    req = P.Exec.from_payload(old["payload"].encode())
    assert (req.argv, req.shell, req.pty, req.cwd, req.env) == (["sh", "-c", "true"], False, None, None,
                                                               {"VMLOADER_JOB_ID": "j1"})


def test_every_control_message_has_a_class_and_every_class_round_trips():
    assert {P.name_of(cls.TYPE) for cls in MESSAGES} == {
        "HELLO", "HEARTBEAT", "EXEC", "STDIN_EOF", "EXIT", "KILL", "RESIZE", "CONNECT", "PUT", "PUT_END",
        "GET", "GET_END", "LIST", "IDENTITY", "OK", "ERROR", "SHUTDOWN"}
    samples = [P.HelloRequest(), P.Hello(1, "0.1", "3.6.8", "5.10", "h", 7, ("pty",), (3,)), P.Heartbeat(),
               P.Exec(None, {"A": "b"}, "root", "/work", True, P.Terminal(30, 100, "vt100")),
               P.Exec(["true"], {}, None), P.StdinEof(), P.Exit(code=0), P.Exit(signal=9),
               P.Exit(error="not_found", message="x: gone"), P.Kill(15), P.Resize(40, 120), P.Connect(8080),
               P.Put("a/b", 0o600, 12, "vmloader"), P.PutEnd(), P.PutDone(12), P.Get("out.txt"), P.GetEnd(3),
               P.ListDir("/work"), P.Listing([P.DirEntry("f", "file", 1, 2)]), P.Error("ValueError: no"),
               P.Shutdown(), P.ShutdownDone(), P.Identity(b"\x01\x02", "vm-1", "a" * 32, 5), P.IdentityDone("vm-1")]
    assert {type(m) for m in samples} == set(MESSAGES)
    for message in samples:
        frame = reader_over(message.encode(5)).read_frame()
        assert (frame.type, frame.request_id) == (message.TYPE, 5)
        assert type(message).from_payload(frame.payload) == message


@pytest.mark.parametrize("cls, payload, field", [
    (P.Exec, {"argv": "sh -c true", "env": {}, "user": "u"}, "argv"),
    (P.Exec, {"argv": ["sh", 1], "env": {}, "user": "u"}, "argv"),
    (P.Exec, {"argv": ["true"], "env": {"A": 1}, "user": "u"}, "env"),
    (P.Exec, {"argv": ["true"], "env": {}, "user": "u", "shell": "yes"}, "shell"),
    (P.Exec, {"argv": ["true"], "env": {}, "user": "u", "pty": {"rows": "24"}}, "rows"),
    (P.Exec, {"argv": ["true"], "env": {}, "user": "u", "pty": [24, 80]}, "pty"),
    (P.Exit, {"code": "0"}, "code"),
    (P.Exit, {"code": True}, "code"),
    (P.Kill, {}, "signal"),
    (P.Kill, {"signal": 9.0}, "signal"),
    (P.Resize, {"rows": 24}, "cols"),
    (P.Connect, {"port": "22"}, "port"),
    (P.Put, {"mode": 420}, "path"),
    (P.Put, {"path": "x", "mode": "0644"}, "mode"),
    (P.Get, {"path": None}, "path"),
    (P.GetEnd, {"size": -1.5}, "size"),
    (P.PutDone, {}, "size"),
    (P.Listing, {"entries": {"a": 1}}, "entries"),
    (P.Listing, {"entries": [{"name": "a", "type": "file", "size": "1", "mtime_ns": 2}]}, "size"),
    (P.Listing, {"entries": [{"type": "file", "size": 1, "mtime_ns": 2}]}, "name"),
    (P.Error, {"message": ["a"]}, "message"),
    (P.Hello, {"agent": "0.1"}, "protocol"),
    (P.Hello, {"protocol": 1, "busy": ["1"]}, "busy"),
    (P.Hello, {"protocol": 1, "features": "pty"}, "features"),
    (P.HelloRequest, {"protocol": "1"}, "protocol"),
])
def test_a_missing_field_or_a_wrong_type_is_a_protocol_error_naming_the_field(cls, payload, field):
    with pytest.raises(P.ProtocolError, match=f"'{field}'"):
        cls.from_payload(json.dumps(payload).encode())


def test_payloads_that_are_not_json_objects_are_refused_by_every_message_that_has_fields():
    for cls in MESSAGES:
        for bad in (b"[1]", b"\xff", b"null", b"{"):
            if issubclass(cls, (P.Heartbeat, P.StdinEof, P.PutEnd)):
                cls.from_payload(bad)                  # no payload: whatever follows the header is ignored
                continue
            with pytest.raises(P.ProtocolError):
                cls.from_payload(bad)


def test_fields_a_newer_peer_adds_are_ignored():
    newer = {"argv": ["true"], "env": {}, "user": "u", "cwd": None, "shell": False, "sandbox": {"x": 1}}
    assert P.Exec.from_payload(json.dumps(newer).encode()) == P.Exec(["true"], {}, "u")
    assert P.Exit.from_payload(b'{"code": 3, "rusage": {"maxrss": 1}}') == P.Exit(code=3)
    assert P.Hello.from_payload(b'{"protocol": 1, "pid": 2, "warm": true}').pid == 2


def test_unset_optional_fields_stay_off_the_wire_and_null_reads_as_unset():
    assert P.Exit(code=0).to_payload() == b'{"code": 0}'
    assert P.Exit.from_payload(b'{"code": null, "error": "spawn_failed", "message": "m"}') == P.Exit(
        error="spawn_failed", message="m")


def test_a_bad_value_is_quoted_shortly_in_the_error():
    with pytest.raises(P.ProtocolError) as info:
        P.HelloRequest.from_payload(json.dumps({"protocol": "v" + "x" * 10_000}).encode())
    assert "must be an integer, not str (vxxx" in str(info.value) and len(str(info.value)) < 300


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=12)
field_names = st.sampled_from(["protocol", "pid", "features", "busy", "argv", "shell", "env", "user", "cwd",
                               "pty", "code", "signal", "error", "message", "rows", "cols", "port", "path",
                               "mode", "size", "entries", "name", "type", "mtime_ns", "term"])


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(MESSAGES), st.dictionaries(field_names, json_values, max_size=6))
def test_any_json_object_parses_into_a_typed_message_or_a_protocol_error(cls, obj):
    try:
        message = cls.from_payload(json.dumps(obj).encode())
    except P.ProtocolError:
        return
    assert cls.from_payload(message.to_payload()) == message


def test_the_identity_request_round_trips_and_refuses_entropy_that_is_not_hex():
    message = P.Identity(b"\x00\xffab", "vm-0c3b04", "0" * 32, 1764111111000000000)
    assert P.Identity.from_payload(message.to_payload()) == message
    with pytest.raises(P.ProtocolError, match="entropy"):
        P.Identity.from_payload(b'{"entropy": "zz", "hostname": "h", "machine_id": "m", "time_ns": 1}')
    with pytest.raises(P.ProtocolError, match="time_ns"):
        P.Identity.from_payload(b'{"entropy": "00", "hostname": "h", "machine_id": "m"}')
    assert P.IdentityDone.from_payload(P.IdentityDone("vm-1").to_payload()).hostname == "vm-1"

import io
import struct
import zlib

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

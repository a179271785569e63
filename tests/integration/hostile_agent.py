"""A hostile agent for fault tests, run INSIDE a real guest as root by the job itself.

It kills the real agent (its parent), takes over the virtio-serial port before
the guest's PID 1 restarts the agent, and answers the host the way a
compromised guest would (argv[1] picks how). Stdlib only; reuses the guest's
copy of the protocol module for well-formed frames.
"""
import json
import os
import struct
import sys
import time
import zlib

sys.path.insert(0, "/usr/lib/vmloader")
from vmloader import protocol as P                       # noqa: E402
from vmloader.agent.transport import find_port           # noqa: E402

MODE = sys.argv[1]


def take_port():
    dev = find_port(P.CHANNEL_NAME)
    os.kill(os.getppid(), 9)                             # the real agent
    deadline = time.time() + 5
    while True:
        try:
            return os.open(dev, os.O_RDWR)
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.005)


fd = take_port()


def send(data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read(n):
    while True:
        data = os.read(fd, n)
        if data:
            return data
        time.sleep(0.05)


def frame(type_, request_id, payload=b""):
    return P.encode(type_, request_id, payload)


reader = P.FrameReader(read)
send(frame(P.HELLO, 0, json.dumps({"protocol": P.PROTOCOL_VERSION, "pid": -1, "features": []}).encode()))
while True:
    try:
        request = reader.read_frame(resync=True)
    except P.ProtocolError:
        continue
    if request.type == P.HELLO:
        send(frame(P.HELLO, 0, json.dumps({"protocol": P.PROTOCOL_VERSION, "pid": -1}).encode()))
    elif request.type == P.LIST:
        entries = [{"name": name, "type": "file", "size": 1, "mtime_ns": 1}
                   for name in ("../escaped", "/etc/cron.d/evil", "..", "sub/../../x", "fine.txt")]
        send(frame(P.OK, request.request_id, json.dumps({"entries": entries}).encode()))
    elif request.type == P.GET and MODE == "endless":
        block = b"\xaa" * P.DATA_CHUNK
        while True:                                    # a never-ending file, as fast as the channel takes it
            send(frame(P.GET_DATA, request.request_id, block))
    elif request.type == P.GET and MODE == "bad-checksum":
        bad = bytearray(frame(P.GET_DATA, request.request_id, b"tampered"))
        bad[-1] ^= 0xFF
        send(bytes(bad))
    elif request.type == P.GET and MODE == "oversized":
        send(struct.pack(">2sBBIII", P.MAGIC, P.PROTOCOL_VERSION, P.GET_DATA, request.request_id, 1 << 31, 0))
    elif request.type == P.GET and MODE == "wrong-id":
        send(frame(P.GET_DATA, request.request_id + 1000, b"for someone else"))
    elif request.type == P.GET and MODE == "unknown-type":
        head = struct.pack(">2sBBII", P.MAGIC, P.PROTOCOL_VERSION, 63, request.request_id, 0)
        send(head + struct.pack(">I", zlib.crc32(head) & 0xFFFFFFFF))
    elif request.type == P.GET:                          # "names": plain answers for the one sane name
        send(frame(P.GET_DATA, request.request_id, b"fine\n"))
        send(frame(P.GET_END, request.request_id, json.dumps({"size": 5}).encode()))
    # SHUTDOWN and everything else: never answered (the host must destroy the VM itself)

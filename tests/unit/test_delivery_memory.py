"""The agent delivery that worked for an image is remembered per image sha256 (per user, private)
and tried alone first by the next job of that image; an overdue or failed remembered way falls
back to probing every way."""
import base64
import json
import os
import threading
import time
from types import SimpleNamespace

import pytest

from vmloader.bootstrapper import delivery
from vmloader.bootstrapper.deliverymemory import DeliveryMemory
from vmloader.bootstrapper.errors import GuestTimeout
from vmloader.bootstrapper.qga import QGAClient

from test_stock_images import FakeQGA, _silent_guest, well_behaved

SHA = "ab" * 32
OTHER = "cd" * 32


def test_a_remembered_delivery_is_recalled_for_the_same_image_only(tmp_path):
    memory = DeliveryMemory(tmp_path / "state" / "deliveries")
    assert memory.recall(SHA) is None
    memory.remember(SHA, "qemu-guest-agent")
    assert memory.recall(SHA) == "qemu-guest-agent" and memory.recall(OTHER) is None
    memory.remember(SHA, "cloud-init")                    # a later job found another way: replaced
    assert memory.recall(SHA) == "cloud-init"
    assert oct((tmp_path / "state" / "deliveries").stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "state" / "deliveries" / SHA).stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in (tmp_path / "state" / "deliveries").iterdir()] == [SHA]   # no temp file left
    with pytest.raises(ValueError):
        memory.remember(SHA, "telepathy")
    memory.forget(SHA)
    assert memory.recall(SHA) is None


def test_a_record_anyone_else_could_have_written_is_no_record(tmp_path):
    directory = tmp_path / "deliveries"
    memory = DeliveryMemory(directory)
    memory.remember(SHA, "cloud-init")
    record = directory / SHA
    os.chmod(record, 0o620)                               # group-writable file
    assert memory.recall(SHA) is None
    os.chmod(record, 0o600)
    os.chmod(directory, 0o777)                            # a directory others may write into
    assert memory.recall(SHA) is None
    os.chmod(directory, 0o700)
    record.unlink()
    (tmp_path / "planted").write_text("builtin\n")
    record.symlink_to(tmp_path / "planted")               # never followed
    assert memory.recall(SHA) is None
    record.unlink()
    record.write_text("rm -rf /\n")                       # an unknown word
    os.chmod(record, 0o600)
    assert memory.recall(SHA) is None
    record.write_text("builtin\n")
    assert memory.recall(SHA) == "builtin"
    if os.geteuid() == 0:                                 # another user's file, even private
        os.chown(record, 12345, 12345)
        assert memory.recall(SHA) is None
    assert DeliveryMemory(tmp_path / "missing").recall(SHA) is None
    assert DeliveryMemory(directory).recall("../../etc/passwd") is None


class FakeAgent:
    """The host side of vmloader's channel: answers the handshake once `arrive()` was called."""

    def __init__(self, delivery_said: str):
        self.said = delivery_said
        self.arrived = threading.Event()
        self.handshakes = 0
        self.info = None

    def arrive(self):
        self.arrived.set()

    def handshake(self, timeout: float):
        self.handshakes += 1
        if not self.arrived.wait(min(timeout, 0.05)):
            raise GuestTimeout("no answer")
        self.info = SimpleNamespace(delivery=self.said)
        return self.info

    def close(self):
        pass


def reach(tmp_path, agent: FakeAgent, remembered, deadline_s: float = 30):
    return delivery.reach_agent(tmp_path / "agent.sock", tmp_path / "qga.sock", tmp_path / "console.log",
                                time.monotonic() + deadline_s, lambda sock: agent,
                                lambda why, hint: GuestTimeout(why, hint=hint), remembered=remembered)


def qga_connections(monkeypatch, agent: FakeAgent) -> list:
    """QGAClient.connect gives a well-behaved qemu-ga whose guest-exec starts our agent; the list
    collects when each connection was made."""
    made = []

    def respond(request):
        if request["execute"] == "guest-exec" and "adopt.sh" in " ".join(request["arguments"]["arg"]):
            agent.arrive()
        return well_behaved(request)

    def connect(path):
        made.append(time.monotonic())
        return QGAClient(FakeQGA(respond).host)
    monkeypatch.setattr(QGAClient, "connect", staticmethod(connect))
    return made


def test_a_remembered_cloud_init_delivery_waits_for_the_agent_alone_without_probing_qemu_ga(tmp_path, monkeypatch):
    server = _silent_guest(tmp_path)
    agent = FakeAgent("cloud-init")
    made = qga_connections(monkeypatch, FakeAgent("unused"))
    threading.Timer(0.5, agent.arrive).start()
    reached = reach(tmp_path, agent, "cloud-init")
    assert (reached.delivery, reached.remembered) == ("cloud-init", True)
    assert made == []                                      # qemu-ga was never asked
    server.close()


def test_a_remembered_qemu_ga_delivery_goes_straight_to_qemu_ga(tmp_path, monkeypatch):
    server = _silent_guest(tmp_path)
    agent = FakeAgent("qemu-guest-agent")
    made = qga_connections(monkeypatch, agent)
    reached = reach(tmp_path, agent, "qemu-guest-agent")
    assert (reached.delivery, reached.remembered) == ("qemu-guest-agent", True)
    assert len(made) == 1 and agent.handshakes == 1       # no handshake probing before the delivery
    server.close()


def test_without_a_record_every_way_is_probed_and_nothing_counts_as_remembered(tmp_path, monkeypatch):
    server = _silent_guest(tmp_path)
    agent = FakeAgent("qemu-guest-agent")
    made = qga_connections(monkeypatch, agent)
    reached = reach(tmp_path, agent, None)
    assert (reached.delivery, reached.remembered) == ("qemu-guest-agent", False)
    assert len(made) == 1 and agent.handshakes >= 2        # ours was asked first, then qemu-ga
    server.close()


def test_an_overdue_remembered_way_falls_back_to_probing_every_way(tmp_path, monkeypatch):
    monkeypatch.setattr(delivery, "AFTER_LOGIN_GRACE", 0.5)
    server = _silent_guest(tmp_path)
    (tmp_path / "console.log").write_text("Debian GNU/Linux 12 localhost ttyS0\n\nlocalhost login: ")
    agent = FakeAgent("qemu-guest-agent")
    made = qga_connections(monkeypatch, agent)
    started = time.monotonic()
    reached = reach(tmp_path, agent, "cloud-init")         # this time cloud-init never starts it
    assert (reached.delivery, reached.remembered) == ("qemu-guest-agent", False)
    assert len(made) == 1 and made[0] - started >= 0.5     # qemu-ga asked only once the grace had passed
    server.close()


def test_a_remembered_way_that_never_answers_still_ends_with_the_no_way_in_error(tmp_path, monkeypatch):
    monkeypatch.setattr(delivery, "AFTER_LOGIN_GRACE", 0.3)
    server = _silent_guest(tmp_path)
    (tmp_path / "console.log").write_text("localhost login: ")
    agent = FakeAgent("cloud-init")
    with pytest.raises(GuestTimeout) as caught:
        reach(tmp_path, agent, "cloud-init")
    assert "org.qemu.guest_agent.0" in str(caught.value) and "cloud-init" in caught.value.hint
    server.close()


def test_a_guest_without_python3_fails_at_once_when_qemu_ga_says_so_not_after_the_boot(tmp_path, monkeypatch):
    monkeypatch.setattr(delivery, "AFTER_LOGIN_GRACE", 600.0)     # a wait would show as a hang here
    server = _silent_guest(tmp_path)

    ran = []

    def no_python(request):
        if request["execute"] == "guest-exec":
            ran.append(" ".join(request["arguments"]["arg"]))
        if request["execute"] == "guest-exec-status" and "adopt.sh" in ran[-1]:
            return json.dumps({"return": {"exited": True, "exitcode": 3, "err-data": base64.b64encode(
                b"vmloader: the guest has no python3 (the agent needs python3 >= 3.6)\n").decode()}}).encode() + b"\n"
        return well_behaved(request)
    monkeypatch.setattr(QGAClient, "connect", staticmethod(lambda path: QGAClient(FakeQGA(no_python).host)))
    (tmp_path / "console.log").write_text("localhost login: ")
    with pytest.raises(GuestTimeout) as caught:
        reach(tmp_path, FakeAgent("unused"), None, deadline_s=600)
    assert "cannot run vmloader's agent" in str(caught.value) and "has no python3" in str(caught.value)
    assert "install python3" in caught.value.hint
    server.close()

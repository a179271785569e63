"""A fake hypervisor for unit tests of the job runner: no VM, no libvirt.

`FakeMachines` implements virt.Machines. A "booted" machine is the real agent
(vmloader.agent.server.Agent) serving on the job's agent socket, running commands as
processes of this host, with the guest's /work mapped to a directory of the test.
Every call is recorded in `events` so tests can check the order of teardown.
"""
import os
import pwd
import signal
import socket
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, List, Optional, Union

from vmloader import protocol as P
from vmloader.agent.server import Agent
from vmloader.agent.transport import SocketTransport
from vmloader.bootstrapper.errors import LibvirtError

ME = pwd.getpwuid(os.getuid())
FAKE_PID_BASE = 40000          # the "QEMU pid" of the fake's first machine; the next ones count up
GUEST_WORKDIR = "/work"


class MappedAgent(Agent):
    """The real agent, with the guest's /work somewhere this test may write."""

    def __init__(self, transport, workdir: Path, poweroff, identity):
        Agent.__init__(self, transport, workdir=str(workdir), lookup_user=lambda name: ME, poweroff=poweroff,
                       identity=identity)

    def _map(self, path):
        if path == GUEST_WORKDIR or (path or "").startswith(GUEST_WORKDIR + "/"):
            return self.workdir + path[len(GUEST_WORKDIR):]
        return path

    def _path(self, path):
        return Agent._path(self, self._map(path))

    def on_shutdown(self, frame):
        self.identity.owner.events.append(("shutdown", self.identity.name))   # the host asked for a sync
        Agent.on_shutdown(self, frame)

    def on_exec(self, frame):
        req = P.Exec.from_payload(frame.payload)
        req.cwd = self._map(req.cwd or GUEST_WORKDIR)
        Agent.on_exec(self, P.Frame(frame.type, frame.request_id, req.to_payload()))


class RecordedIdentity:
    """Stands in for agent.server.Identity: records what the guest was told instead of changing this host."""

    def __init__(self, owner: "FakeMachines", name: str):
        self.owner = owner
        self.name = name

    def apply(self, entropy, hostname, machine_id, time_ns):
        self.owner.events.append(("identity", self.name))
        self.owner.identities.append({"entropy": entropy, "hostname": hostname, "machine_id": machine_id,
                                      "time_ns": time_ns})
        return ["set the hostname (fake: refused)"] if self.owner.identity_fails else []


class FakeMachine:
    def __init__(self, owner: "FakeMachines", name: str, socket_path: str, console_log: str, pid: int):
        self.owner = owner
        self.name = name
        self.pid = pid
        self.pending_boot: Optional[tuple] = None     # started paused: (console text, answers) on resume
        self.socket_path = socket_path
        self.console_log = console_log
        self.active = True
        self.agent: Optional[MappedAgent] = None
        self.listener: Optional[socket.socket] = None

    def boot(self, console_text: str, answers: bool) -> None:
        Path(self.console_log).write_text(console_text)
        if not answers:
            return                                # the guest hangs before its agent starts
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(self.socket_path):      # QEMU replaces a stale socket file too
            os.unlink(self.socket_path)
        self.listener.bind(self.socket_path)
        self.listener.listen(1)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return                                # stopped before the host connected
        self.agent = MappedAgent(SocketTransport(conn), self.owner.workdir, poweroff=self._poweroff,
                                 identity=RecordedIdentity(self.owner, self.name))
        self.agent.serve()

    def _poweroff(self) -> None:
        self.owner.events.append(("poweroff", self.name))
        self.active = False

    def _stop(self) -> None:
        """What stopping QEMU does to the guest's processes and its agent channel."""
        self.active = False
        if self.agent is not None:
            for execution in list(self.agent.execs.values()):
                execution.kill(signal.SIGKILL)
        if self.listener is not None:
            self.listener.close()

    def is_active(self) -> bool:
        return self.active

    def resume(self) -> None:
        """A VM started paused runs from here: its guest boots only now."""
        self.owner.events.append(("resume", self.name))
        if self.owner.on_resume is not None:
            self.owner.on_resume(self)
        if self.pending_boot is not None:
            console_text, answers = self.pending_boot
            self.pending_boot = None
            self.boot(console_text, answers)

    def qemu_pid(self) -> Optional[int]:
        return self.pid if self.owner.pid_known else None

    def paused_on_io_error(self) -> bool:
        return False

    def pause(self) -> None:
        """What pausing QEMU does: the guest's processes stop where they are."""
        self.owner.events.append(("pause", self.name))
        if self.agent is not None:
            for execution in list(self.agent.execs.values()):
                execution.kill(signal.SIGSTOP)

    def save(self, path: Path) -> None:
        self.owner.events.append(("save", self.name))
        if self.owner.save_fails:
            raise LibvirtError(self.owner.save_fails if isinstance(self.owner.save_fails, str) else "fake: cannot save")
        Path(path).write_text(self.owner.xml_of[self.name])
        self._stop()

    def destroy(self) -> None:
        self.owner.events.append(("destroy", self.name))
        self._stop()

    def kill(self) -> None:
        self.owner.events.append(("kill", self.name))
        self._stop()


class FakeMachines:
    """Records what the runner asks for; `boot_answers=False` makes guests that never reach
    their agent (their console says `console_text`)."""

    def __init__(self, workdir: Path, boot_answers: bool = True, save_fails: Union[bool, str] = False,
                 console_text: str = "[    0.000000] Linux version 6.1 (fake)\nfake: booted\n",
                 restore_fails: bool = False, restore_answers: bool = True, identity_fails: bool = False,
                 pid_known: bool = True, on_resume: Optional[Callable[["FakeMachine"], None]] = None):
        self.workdir = workdir
        self.boot_answers = boot_answers
        self.save_fails = save_fails
        self.restore_fails = restore_fails          # libvirt refuses the saved state
        self.restore_answers = restore_answers      # False: the restored guest's agent stays silent
        self.identity_fails = identity_fails
        self.pid_known = pid_known                  # False: the machine cannot tell its QEMU's pid
        self.on_resume = on_resume                  # called as a paused machine resumes (tests look around)
        self.identities: List[dict] = []
        self.console_text = console_text
        self.events: List[tuple] = []
        self.machines: List[FakeMachine] = []
        self.xml_of: dict = {}

    def __call__(self, uri: str) -> "FakeMachines":
        """Stands in for virt.LibvirtMachines as the runner's `connect`."""
        self.events.append(("connect", uri))
        return self

    def _machine(self, xml: str, answers: Optional[bool] = None, paused: bool = False) -> FakeMachine:
        root = ET.fromstring(xml)
        name = root.findtext("name")
        channel = root.find("devices/channel/source").get("path")
        console = root.find("devices/serial/log").get("file")
        machine = FakeMachine(self, name, channel, console, pid=FAKE_PID_BASE + len(self.machines))
        self.machines.append(machine)
        self.xml_of[name] = xml
        boot = (self.console_text, self.boot_answers if answers is None else answers)
        if paused:
            self.events.append(("paused", name))
            machine.pending_boot = boot
        else:
            machine.boot(*boot)
        return machine

    def create(self, xml: str, paused: bool = False) -> FakeMachine:
        self.events.append(("create", ET.fromstring(xml).findtext("name")))
        return self._machine(xml, paused=paused)

    def saved_xml(self, state: Path) -> str:
        return Path(state).read_text()

    def restore(self, state: Path, xml: str, name: str, paused: bool = False) -> FakeMachine:
        self.events.append(("restore", name))
        if self.restore_fails:
            raise LibvirtError("fake: the saved state is damaged")
        if name in (m.name for m in self.machines if m.active):
            raise LibvirtError(f"fake: domain {name} already exists")      # what libvirt says to a 2nd restore
        return self._machine(xml, answers=self.restore_answers, paused=paused)

    def host_identity(self) -> dict:
        return {"libvirt": 1, "hypervisor": 1, "uri": "test:///fake"}

    def close(self) -> None:
        self.events.append(("close",))

    def kinds(self) -> list:
        return [event[0] for event in self.events]

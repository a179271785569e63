"""Reaching an agent in an image with its own boot: ours if baked in, else delivered at boot.

Tried together until the boot deadline, the first that answers wins:
- "builtin": the image already runs vmloader's agent (a site baked it in);
- "qemu-guest-agent": the image runs qemu-ga on org.qemu.guest_agent.0; our stdlib
  agent (a zip of vmloader/agent + protocol.py) and adopt.sh are written into
  /run/vmloader-agent with guest-file-*, and adopt.sh started with guest-exec;
- "cloud-init": the image's cloud-init read the job's cidata seed (cidata.py), whose
  bootcmd does the same. Whichever comes first starts the agent (adopt.sh takes a
  lock), and the agent says which it was.
Neither: GuestTimeout (exit 125) naming what was looked for, soon after the guest
reaches its login prompt instead of at the end of the boot timeout; when the console shows
the image's cloud-init ran but never read the seed (a site's datasource_list without NoCloud),
that is what the error says.

With a way remembered for the image (deliverymemory.py), that way is tried alone first: no
probing of the others unless it has not answered within the grace after the boot finished.
"""
import io
import logging
import re
import socket
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import build
from .agentclient import AgentClient
from .console import crash_line, tail
from .errors import AgentError, GuestTimeout
from .guesttext import cap, escape
from .qga import QGAClient, QGAError

BUILTIN = "builtin"
QEMU_GUEST_AGENT = "qemu-guest-agent"
CLOUD_INIT = "cloud-init"
GUEST_DIR = "/run/vmloader-agent"
# The guest's boot has finished: its login prompt, or (when no getty comes to the serial console,
# e.g. its device showed up late) systemd's "Reached target multi-user.target - Multi-User System."
LOGIN_MARKS = ("login:", "Multi-User System.")
NO_BOOT_MARKS = ("No bootable device", "Boot failed", "No bootable option")
log = logging.getLogger(__name__)
AFTER_LOGIN_GRACE = 30.0     # qemu-ga and cloud-init start around the login prompt; give them this long
AFTER_LOGIN_GRACE_QGA_STARTED = 120.0   # ... and at least this long when the console says qemu-ga started
QGA_STARTED_MARKS = ("Started qemu-guest-agent", "QEMU Guest Agent.")   # systemd's line for its unit


def agent_bundle() -> bytes:
    """vmloader's agent as one zip python3 runs from (`PYTHONPATH=zip python3 -m vmloader.agent`)."""
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in build._agent_sources():
            if path.suffix == ".py":
                info = zipfile.ZipInfo(str(Path("vmloader") / path.relative_to(build.PACKAGE_ROOT)),
                                       (2000, 1, 1, 0, 0, 0))     # the same bytes every time
                info.compress_type = zipfile.ZIP_DEFLATED
                bundle.writestr(info, path.read_bytes())
    return data.getvalue()


def adopt_script() -> bytes:
    return (build.PACKAGE_ROOT / "agent" / "adopt.sh").read_bytes()


@dataclass
class Reached:
    client: AgentClient
    delivery: str
    remembered: bool = False       # reached the remembered way, the others never probed


ADOPT_NO_PYTHON, ADOPT_NO_USER = 3, 4      # adopt.sh's exits for what no other way would get past either


class GuestUnfit(AgentError):
    """adopt.sh ran and said the guest cannot run the agent at all (no python3 >= 3.6, no job user):
    every way in runs the same script, so no other is waited for."""


def deliver_via_qga(qga: QGAClient) -> None:
    """Write the agent into the guest and start it; AgentError with the guest's words if that fails."""
    code, _, err = qga.exec("/bin/sh", ["-c", f"umask 077; mkdir -p {GUEST_DIR}"], timeout=30)
    if code != 0:
        raise AgentError(f"the QEMU guest agent could not make {GUEST_DIR}: {_text(err)}")
    qga.write_file(f"{GUEST_DIR}/vmloader-agent.zip", agent_bundle())
    qga.write_file(f"{GUEST_DIR}/adopt.sh", adopt_script())
    code, out, err = qga.exec("/bin/sh", [f"{GUEST_DIR}/adopt.sh", GUEST_DIR, QEMU_GUEST_AGENT], timeout=60)
    if code != 0:
        kind = GuestUnfit if code in (ADOPT_NO_PYTHON, ADOPT_NO_USER) else AgentError
        raise kind(f"starting vmloader's agent through the QEMU guest agent failed (exit {code}): "
                   f"{_text(err or out)}",
                   hint={ADOPT_NO_PYTHON: "install python3 (>= 3.6) in the image: vmloader's agent is "
                                          "stdlib-only (docs/stock-images.md)",
                         ADOPT_NO_USER: "give the image useradd, or a 'vmloader' user"}.get(
                       code, "the guest needs python3 >= 3.6 and useradd (or a 'vmloader' user)"))


def delivery_of(client: AgentClient) -> str:
    """What the agent says brought it (adopt.sh tells it); an agent that does not say is baked in."""
    said = client.info.delivery if client.info is not None else None
    return said if said in (QEMU_GUEST_AGENT, CLOUD_INIT) else BUILTIN


def _text(data: bytes) -> str:
    from .agentclient import guest_text
    return guest_text(data[-500:].decode("utf-8", "replace").strip())


def reach_agent(agent_socket: Path, qga_socket: Path, console_log: Path, deadline: float,
                make_client: Callable[[socket.socket], AgentClient],
                failure: Callable[[str, str], GuestTimeout], remembered: Optional[str] = None,
                grace: Optional[float] = None) -> Reached:
    """Wait for ours or deliver it; `failure(why, hint)` builds the error for no way in. `remembered`:
    the way that worked for this image before, tried alone until it is overdue. `grace`: how long
    after the boot finished nothing may answer (default AFTER_LOGIN_GRACE; the config's
    stock_boot_grace)."""
    sock = _connect(agent_socket, deadline, failure)
    client = make_client(sock)
    qga: Optional[QGAClient] = None
    login_seen: Optional[float] = None
    qga_problem = ""
    qga_seen = False
    grace = AFTER_LOGIN_GRACE if grace is None else grace
    only = remembered if remembered in (BUILTIN, QEMU_GUEST_AGENT, CLOUD_INIT) else None
    started = time.monotonic()
    try:
        while True:
            if only != QEMU_GUEST_AGENT:         # ours answers when baked in or cloud-init started it
                try:
                    client.handshake(timeout=1.0)
                    return Reached(client, delivery_of(client), remembered=only is not None)
                except GuestTimeout:
                    pass
            if qga is None and not qga_problem and only in (None, QEMU_GUEST_AGENT):
                try:
                    qga = QGAClient.connect(str(qga_socket))
                except OSError:
                    qga = None
                    if only == QEMU_GUEST_AGENT:
                        time.sleep(0.5)          # (no handshake wait paces this loop)
            if qga is not None:
                try:
                    qga.sync(timeout=1.0)
                except QGAError:
                    pass
                else:
                    log.debug("the QEMU guest agent answered %.1f s into the boot; delivering", _since(started))
                    try:
                        deliver_via_qga(qga)
                    except GuestUnfit as exc:
                        raise failure(f"the guest cannot run vmloader's agent: {exc.message}", exc.hint or "") from None
                    except AgentError as exc:
                        qga_problem = exc.message
                        log.debug("delivery through the QEMU guest agent failed: %s", exc.message)
                        only = None             # remembered or not, it failed: every other way now
                        qga.close()
                        qga = None
                    else:
                        log.debug("agent started through the QEMU guest agent %.1f s into the boot",
                                  _since(started))
                        client.handshake(timeout=max(5.0, deadline - time.monotonic()))
                        return Reached(client, delivery_of(client), remembered=only is not None)
            console = tail(console_log, 40)
            if any(mark in console for mark in NO_BOOT_MARKS):
                raise failure("the firmware found nothing to boot on the disk",
                              "the disk has no boot loader for its boot mode: check `images add --boot`, "
                              "or give --kernel and --initrd to boot its kernel directly")
            crash = crash_line(console_log) if login_seen is None else None
            if crash is not None and "Kernel panic" in crash:
                raise failure(f"the guest kernel panicked while booting: {_text(crash.encode())}",
                              "the console log shows why; a panic early in the boot under TCG on an "
                              "overloaded host (e.g. 'IO-APIC + timer doesn't work') is worth a retry")
            if login_seen is None and any(mark in console for mark in LOGIN_MARKS):
                login_seen = time.monotonic()
                log.debug("login prompt on the console %.1f s into the boot", _since(started))
            gave_up = login_seen is not None and time.monotonic() - login_seen > grace
            if gave_up and only is not None:
                # The remembered way is overdue: the image (same sha256) behaves differently this
                # time (e.g. a config it reads from the job); probe every way, with a fresh grace.
                log.debug("the remembered delivery %s did not answer; trying every way", only)
                only, login_seen, gave_up = None, time.monotonic(), False
            if gave_up and not qga_seen and not qga_problem and qga_started(console_log):
                # qemu-ga is up (the console says so) but has not answered yet: on a loaded host
                # it can lag the login prompt; wait for it longer, still bounded.
                grace, gave_up = max(grace, AFTER_LOGIN_GRACE_QGA_STARTED), False
                qga_seen = True
            if gave_up or time.monotonic() > deadline:
                why, hint = _nothing_found(qga_problem, gave_up, grace, qga_seen), NO_WAY_IN_HINT
                # Past the login prompt cloud-init's early stages are over (they come before sysinit.target):
                # had it read the seed, its bootcmd would have started the agent by then.
                ignored = cloud_init_ignored_seed(tail(console_log, CLOUD_INIT_CONSOLE_LINES)) if gave_up else None
                if ignored is not None:
                    why, hint = _seed_ignored(ignored, qga_problem, grace, qga_seen), SEED_IGNORED_HINT
                if only is not None:
                    why = (f"nothing answered within the boot timeout, and the boot never finished: tried "
                           f"the way in that worked for this image before ({only}) alone")
                raise failure(why, hint)
    except BaseException:
        client.close()
        raise
    finally:
        if qga is not None:
            qga.close()


NO_WAY_IN_HINT = ("make the image reachable in one of these ways: run vmloader's agent in it "
                  "(docs/stock-images.md says how to bake it in), install qemu-guest-agent "
                  "(with guest-exec and guest-file-* allowed), or install cloud-init with its NoCloud "
                  "datasource; the guest needs python3 >= 3.6")


def qga_started(console_log: Path) -> bool:
    """The guest's console says its qemu-ga unit started (systemd prints it there)."""
    console = tail(console_log, 400)
    return any(mark in console for mark in QGA_STARTED_MARKS)


def _when(after_login: bool, grace: float) -> str:
    return (f"the guest's boot finished (its login prompt or multi-user.target on the console) and nothing "
            f"answered within {grace:.0f} s"
            if after_login else "nothing answered within the boot timeout")


def _qga_state(qga_problem: str, qga_seen: bool) -> str:
    return (f"the QEMU guest agent answered but delivery failed: {qga_problem}" if qga_problem
            else "the QEMU guest agent started on the guest's console but never answered on "
                 "org.qemu.guest_agent.0" if qga_seen
            else "no QEMU guest agent on org.qemu.guest_agent.0")


def _nothing_found(qga_problem: str, after_login: bool, grace: float = AFTER_LOGIN_GRACE,
                   qga_seen: bool = False) -> str:
    return (f"{_when(after_login, grace)}: looked for vmloader's agent (no answer on its channel), "
            f"{_qga_state(qga_problem, qga_seen)}, and cloud-init starting the agent from the job's cidata "
            f"seed (it did not: no cloud-init, or it ignored the seed)")


# cloud-init's own console lines (stderr of its units, which systemd copies to the console): each stage
# starts with "Cloud-init v. 22.4.2 running 'init-local' at ...", the last ends with cc_final_message's
# "Cloud-init v. 22.4.2 finished at <date>. Datasource DataSourceNone.  Up 61.20 seconds".
CLOUD_INIT_RAN = re.compile(r"Cloud-init v\. \S+ (?:running '|finished at )")
CLOUD_INIT_FINISHED = re.compile(r"Cloud-init v\. \S+ finished at .*? Datasource DataSource(\w+)(.*?)\.  Up ")
CLOUD_INIT_CONSOLE_LINES = 2000        # the whole boot's console from cloud-init's first stage on (tail caps bytes)
# NoCloud's description names what it read: "[seed=dmi,/dev/vdb]" for our SMBIOS serial and the cidata disk.
NOCLOUD_READ_A_DISK = re.compile(r"\[seed=[^\]]*/dev/")
# The seed's bootcmd ran: adopt.sh's "started" (or "already started", after qemu-ga) or its complaint
# ("vmloader: the guest has no python3 ...") as cloud-init's output, or systemd starting the agent's unit.
SEED_RAN = re.compile(r"cloud-init\[\d+\]: (?:(?:already )?started$|vmloader: )|vmloader-agent", re.MULTILINE)


def cloud_init_ignored_seed(console: str) -> Optional[str]:
    """When the console of a guest whose boot finished shows its cloud-init ran but never ran the seed's
    bootcmd: what it used instead ("datasource None"; "" when its last stage has not said yet), escaped.
    None when cloud-init did not show itself, or the seed was read (then something else went wrong:
    the generic error stays)."""
    if not CLOUD_INIT_RAN.search(console) or SEED_RAN.search(console):
        return None
    finished = CLOUD_INIT_FINISHED.findall(console)
    if not finished:
        return ""
    name, rest = finished[-1]              # a guest rebooted by its own config prints one per boot
    if name == "NoCloud" and NOCLOUD_READ_A_DISK.search(rest):
        return None
    return cap(escape(f"datasource {name}{rest}"), 200)


def _seed_ignored(used: str, qga_problem: str, grace: float, qga_seen: bool) -> str:
    instead = (f": it used {used}" if used
               else ": its early stages ran (their lines on the console) and ended without running the "
                    "seed's bootcmd, which starts the agent")
    return (f"{_when(True, grace)}: cloud-init ran in the guest but never read vmloader's seed "
            f"(the `cidata` disk, NoCloud){instead}; {_qga_state(qga_problem, qga_seen)}, and no "
            f"vmloader's agent baked in (no answer on its channel)")


SEED_IGNORED_HINT = ("the image's cloud-init must be allowed to read the job's NoCloud seed: NoCloud in "
                     "datasource_list of /etc/cloud/cloud.cfg and /etc/cloud/cloud.cfg.d/*.cfg (a site "
                     "config such as `datasource_list: [ None ]` or `[ Ec2 ]` shuts it out), and no "
                     "/etc/cloud/cloud-init.disabled; or install qemu-guest-agent (with guest-exec and "
                     "guest-file-* allowed), or bake vmloader's agent into the image (docs/stock-images.md); "
                     "the guest needs python3 >= 3.6")


def _since(started: float) -> float:
    return time.monotonic() - started


def _connect(path: Path, deadline: float, failure: Callable[[str, str], GuestTimeout]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                sock.close()
                raise failure("the agent channel never appeared", "check the VM started (virsh list)") from None
            time.sleep(0.1)

"""Images with their own boot loader: boot mode read from the disk, firmware in the domain XML,
the QEMU guest agent client (hostile replies), the agent bundle delivered into such guests."""
import base64
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
import zipfile
import io

import pytest

from vmloader.bootstrapper import bootmode, catalog, delivery
from vmloader.bootstrapper.domain import (QEMU_NS, QGA_CHANNEL, BootSpec, ChannelSpec, ConsoleSpec, DiskSpec,
                                          DomainSpec, NetworkSpec, domain_xml)
from vmloader.bootstrapper.qga import MAX_REPLY, QGAClient, QGAError

ESP = uuid.UUID(bootmode.ESP_GUID).bytes_le
LINUX = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4").bytes_le


def mbr(boot_code: bytes = b"", partition_type: int = 0x83) -> bytearray:
    head = bytearray(bootmode.HEAD_SECTORS * 512)
    head[:len(boot_code)] = boot_code
    head[446 + 4] = partition_type
    head[510:512] = b"\x55\xaa"
    return head


def gpt(*types: bytes) -> bytearray:
    head = mbr(b"", bootmode.GPT_PROTECTIVE)
    head[512:520] = b"EFI PART"
    head[512 + 72:512 + 88] = struct.pack("<QII", 2, 128, 128)
    for n, type_guid in enumerate(types):
        head[1024 + 128 * n:1024 + 128 * n + 16] = type_guid
    return head


def test_boot_mode_is_read_from_the_partition_table_and_the_boot_code():
    assert bootmode.detect(bytes(gpt(LINUX, ESP))) == "uefi"
    assert bootmode.detect(bytes(mbr(b"\xeb\x63\x90grub"))) == "bios"
    assert bootmode.detect(bytes(mbr())) is None                     # a partition table, no boot code
    assert bootmode.detect(bytes(gpt(LINUX))) is None                # GPT without an ESP, no boot code
    assert bootmode.detect(bytes(1024)) is None                      # blank
    assert bootmode.detect(b"") is None


def test_a_hostile_gpt_header_is_bounded_not_trusted():
    head = gpt(ESP)
    head[512 + 72:512 + 88] = struct.pack("<QII", 2 ** 40, 2 ** 31, 2 ** 20)   # far away, huge
    assert bootmode.gpt_partition_types(bytes(head)) == []
    assert bootmode.detect(bytes(head)) is None


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")
def test_boot_mode_is_read_through_qcow2(tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(gpt(LINUX, ESP)) + bytes(1024 * 1024))
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)], check=True)
    assert bootmode.detect_disk(disk) == "uefi"


def test_the_catalogue_knows_the_boot_modes_and_refuses_others():
    entry = catalog.parse_manifest({"schema_version": 1, "images": [
        {"name": "a", "version": "1", "boot": "uefi"}, {"name": "b", "version": "1", "boot": "firmware"}]})
    assert [e.firmware for e in entry.images] == ["uefi", "bios"]
    with pytest.raises(Exception, match="unknown boot mode"):
        catalog.parse_manifest({"schema_version": 1, "images": [{"name": "a", "version": "1", "boot": "floppy"}]})


UEFI = BootSpec(None, None, firmware="uefi", loader="/usr/share/OVMF/OVMF_CODE_4M.fd", nvram="/jobs/j/uefi-vars.fd")


def stock_spec(boot: BootSpec = UEFI, network: str = "none") -> DomainSpec:
    return DomainSpec(name="vmloader-j", hypervisor="qemu", memory_mib=1024, vcpus=1, boot=boot,
                      disks=(DiskSpec("/jobs/j/overlay.qcow2", backing="/cache/base"),),
                      channel=ChannelSpec("/jobs/j/agent.sock"), console=ConsoleSpec("/jobs/j/console.log"),
                      qga_channel=ChannelSpec("/jobs/j/qga.sock", name=QGA_CHANNEL),
                      network=NetworkSpec(network, isolated_nic=True))


def test_a_uefi_stock_image_gets_ovmf_its_own_variable_store_a_qga_port_and_a_nic_reaching_nothing(tmp_path):
    xml = domain_xml(stock_spec())
    root = ET.fromstring(xml)
    loader = root.find("os/loader")
    assert loader.text == UEFI.loader and loader.get("readonly") == "yes" and loader.get("type") == "pflash"
    assert root.findtext("os/nvram") == "/jobs/j/uefi-vars.fd"
    names = [t.get("name") for t in root.findall("devices/channel/target")]
    assert names == ["org.vmloader.agent.0", QGA_CHANNEL]
    args = [a.get("value") for a in root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    assert "user,id=vmlnone,restrict=on" in args
    assert root.find("devices/interface") is None
    if shutil.which("virt-xml-validate"):
        (tmp_path / "d.xml").write_text(xml)
        result = subprocess.run(["virt-xml-validate", str(tmp_path / "d.xml"), "domain"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_with_network_the_stock_image_gets_the_ordinary_nic_and_no_qemu_arguments():
    root = ET.fromstring(domain_xml(stock_spec(BootSpec(None, None), network="user")))
    assert root.find("devices/interface").get("type") == "user"
    assert root.find(f"{{{QEMU_NS}}}commandline") is None
    assert root.find("os/loader") is None and root.find("os/boot").get("dev") == "hd"
    assert root.find("os/bios").get("useserial") == "yes"      # SeaBIOS's words reach the console log


class FakeQGA:
    """qemu-ga's side of the channel: answers what `respond` says to each request."""

    def __init__(self, respond):
        self.host, self.guest = socket.socketpair()
        self.respond = respond
        self.requests: list = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        buffer = b""
        while True:
            data = self.guest.recv(65536)
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                request = json.loads(line.lstrip(b"\xff"))
                self.requests.append(request)
                reply = self.respond(request)
                if reply is not None:
                    self.guest.sendall(reply)


def well_behaved(request):
    command, args = request["execute"], request.get("arguments", {})
    if command == "guest-sync-delimited":
        return b'{"return": 999}\n\xff' + json.dumps({"return": args["id"]}).encode() + b"\n"
    if command == "guest-file-open":
        return b'{"return": 7}\n'
    if command == "guest-file-write":
        return json.dumps({"return": {"count": len(base64.b64decode(args["buf-b64"])), "eof": False}}).encode() + b"\n"
    if command == "guest-exec":
        return b'{"return": {"pid": 42}}\n'
    if command == "guest-exec-status":
        return json.dumps({"return": {"exited": True, "exitcode": 0,
                                      "out-data": base64.b64encode(b"ok").decode()}}).encode() + b"\n"
    return b'{"return": {}}\n'


def test_qga_client_syncs_past_stale_replies_writes_files_in_chunks_and_runs_programs():
    fake = FakeQGA(well_behaved)
    client = QGAClient(fake.host)
    client.sync(timeout=5)
    data = bytes(range(256)) * 1000
    client.write_file("/run/x", data)
    assert client.exec("/bin/true", []) == (0, b"ok", b"")
    writes = [r for r in fake.requests if r["execute"] == "guest-file-write"]
    assert b"".join(base64.b64decode(r["arguments"]["buf-b64"]) for r in writes) == data
    assert fake.requests[-3]["execute"] == "guest-file-close"


def test_a_qemu_ga_still_answering_a_backlog_of_earlier_syncs_is_waited_for_not_given_up_on():
    # qemu-ga started late: it first answers a sync queued while its port was closed, and ours
    # only after the first-contact timeout has passed.
    fake = None

    def catching_up(request):
        time.sleep(0.6)
        fake.guest.sendall(b'\xff{"return": 1}\n')
        time.sleep(0.8)
        return b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n"
    fake = FakeQGA(catching_up)
    QGAClient(fake.host).sync(timeout=1.0, catching_up=10.0)
    stuck = FakeQGA(lambda r: b'\xff{"return": 1}\n')
    with pytest.raises(QGAError, match="in time"):     # stale replies alone never do, and the wait is bounded
        QGAClient(stuck.host).sync(timeout=0.2, catching_up=0.5)


def test_qga_replies_are_bounded_in_size_and_time():
    flood = FakeQGA(lambda r: b"x" * (MAX_REPLY + 10))
    with pytest.raises(QGAError, match="longer than"):
        QGAClient(flood.host).call("guest-info", timeout=5)
    silent = FakeQGA(lambda r: None)
    with pytest.raises(QGAError, match="in time"):
        QGAClient(silent.host).sync(timeout=0.5)
    refusing = FakeQGA(lambda r: b'{"error": {"class": "GenericError", "desc": "guest-exec is disabled"}}\n')
    with pytest.raises(QGAError, match="disabled"):
        QGAClient(refusing.host).exec("/bin/sh", [])
    blocked = FakeQGA(lambda r: b'{"error": {"class": "CommandNotFound", '
                              b'"desc": "Command guest-exec has been disabled"}}\n')
    with pytest.raises(QGAError, match=r"guest-exec is disabled in the guest's qemu-ga by its configuration "
                                       r"\(block-rpcs or allow-rpcs in /etc/qemu/qemu-ga.conf"):
        QGAClient(blocked.host).exec("/bin/sh", [])
    junk = FakeQGA(lambda r: b"[1, 2]\n")
    with pytest.raises(QGAError, match="not a JSON object"):
        QGAClient(junk.host).call("guest-info", timeout=5)


def test_the_agent_bundle_runs_from_its_zip_with_the_stdlib_alone(tmp_path):
    bundle = tmp_path / "vmloader-agent.zip"
    bundle.write_bytes(delivery.agent_bundle())
    assert delivery.agent_bundle() == bundle.read_bytes()            # reproducible
    names = zipfile.ZipFile(io.BytesIO(bundle.read_bytes())).namelist()
    assert "vmloader/agent/__main__.py" in names and "vmloader/protocol.py" in names
    result = subprocess.run([sys.executable, "-I", "-c",
                             "import sys; sys.path.insert(0, sys.argv[1]); import vmloader.agent.server, "
                             "vmloader.agent.__main__; print('ok')", str(bundle)],
                            capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


def test_the_guest_side_start_script_is_valid_sh():
    subprocess.run(["sh", "-n", "-c", delivery.adopt_script().decode()], check=True)


@pytest.mark.skipif(shutil.which("mcopy") is None, reason="mtools missing")
def test_the_cloud_init_seed_is_a_cidata_vfat_holding_per_job_meta_data_and_the_agent(tmp_path):
    from vmloader.bootstrapper import cidata
    seed = tmp_path / "cidata.img"
    cidata.make_seed(seed, "20261125-000000-abcdef", "vm-abcdef")
    assert (seed.stat().st_mode & 0o077) == 0
    label = subprocess.run(["mlabel", "-s", "-i", str(seed), "::"], capture_output=True, text=True).stdout
    assert "CIDATA" in label.upper()
    meta = json.loads(subprocess.run(["mtype", "-i", str(seed), "::meta-data"], capture_output=True,
                                     text=True, check=True).stdout)
    assert meta == {"instance-id": "vmloader-20261125-000000-abcdef", "local-hostname": "vm-abcdef"}
    user = subprocess.run(["mtype", "-i", str(seed), "::user-data"], capture_output=True, text=True,
                          check=True).stdout
    assert user.startswith("#cloud-config\n")
    config = json.loads(user.split("\n", 1)[1])
    command = config["bootcmd"][0][2]
    assert command.endswith("adopt.sh /run/vmloader-agent cloud-init")
    # One host key made per VM, the one `snapshot boot --ssh` pins: no RSA key generated beside the job.
    assert config["ssh_genkeytypes"] == ["ed25519"]
    subprocess.run(["sh", "-n", "-c", command], check=True)


def test_a_stock_domain_reads_the_seed_read_only_and_tells_cloud_init_to_look_nowhere_else(tmp_path):
    from dataclasses import replace
    spec = replace(stock_spec(), smbios_serial="ds=nocloud",
                   disks=stock_spec().disks + (DiskSpec("/jobs/j/cidata.img", target="vdb", fmt="raw",
                                                         readonly=True),))
    xml = domain_xml(spec)
    root = ET.fromstring(xml)
    assert root.findtext("sysinfo/system/entry[@name='serial']") == "ds=nocloud"
    assert root.find("os/smbios").get("mode") == "sysinfo"
    seed = root.findall("devices/disk")[1]
    assert seed.find("readonly") is not None and seed.find("driver").get("type") == "raw"
    if shutil.which("virt-xml-validate"):
        (tmp_path / "d.xml").write_text(xml)
        result = subprocess.run(["virt-xml-validate", str(tmp_path / "d.xml"), "domain"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def _silent_guest(tmp_path):
    """An agent channel nobody answers on (the guest has no agent yet), no QGA socket at all."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "agent.sock"))
    server.listen(1)
    return server


def _reach(tmp_path, deadline_s, grace=None):
    import time
    from vmloader.bootstrapper.agentclient import AgentClient
    from vmloader.bootstrapper.errors import GuestTimeout
    return delivery.reach_agent(tmp_path / "agent.sock", tmp_path / "qga.sock", tmp_path / "console.log",
                                time.monotonic() + deadline_s, lambda sock: AgentClient(sock),
                                lambda why, hint: GuestTimeout(why, hint=hint), grace=grace)


def test_no_boot_loader_on_the_console_fails_at_once_naming_it(tmp_path):
    server = _silent_guest(tmp_path)
    (tmp_path / "console.log").write_text("SeaBIOS\nBoot failed: not a bootable disk\nNo bootable device.\n")
    with pytest.raises(delivery.GuestTimeout, match="nothing to boot") as caught:
        _reach(tmp_path, 60)
    assert "--boot" in caught.value.hint
    server.close()


def test_a_kernel_panic_while_booting_fails_at_once_naming_it(tmp_path):
    server = _silent_guest(tmp_path)
    (tmp_path / "console.log").write_text("[    0.052000] ---[ end Kernel panic - not syncing: IO-APIC + timer "
                                          "doesn't work!  Boot with apic=debug\n")
    with pytest.raises(delivery.GuestTimeout, match="panicked while booting: .*IO-APIC") as caught:
        _reach(tmp_path, 60)
    assert "retry" in caught.value.hint
    server.close()


def test_a_login_prompt_with_no_way_in_fails_soon_naming_everything_looked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(delivery, "AFTER_LOGIN_GRACE", 1.0)
    server = _silent_guest(tmp_path)
    (tmp_path / "console.log").write_text("Debian GNU/Linux 12 localhost ttyS0\n\nlocalhost login: ")
    with pytest.raises(delivery.GuestTimeout) as caught:
        _reach(tmp_path, 60)
    message = str(caught.value)
    assert "login prompt" in message and "vmloader's agent" in message
    assert "org.qemu.guest_agent.0" in message and "cidata" in message
    assert "boot_timeout" not in message and "cloud-init" in caught.value.hint
    server.close()


def test_the_configured_grace_after_the_login_prompt_is_the_one_waited(tmp_path, monkeypatch):
    monkeypatch.setattr(delivery, "AFTER_LOGIN_GRACE", 600.0)      # the default would show as a hang here
    server = _silent_guest(tmp_path)
    (tmp_path / "console.log").write_text("Debian GNU/Linux 12 localhost ttyS0\n\nlocalhost login: ")
    with pytest.raises(delivery.GuestTimeout, match="on the console. and nothing answered within 1 s"):
        _reach(tmp_path, 60, grace=1)
    server.close()


def test_a_configured_grace_shorter_than_qemu_gas_still_waits_for_a_qemu_ga_the_console_shows(tmp_path,
                                                                                               monkeypatch):
    monkeypatch.setattr(delivery, "AFTER_LOGIN_GRACE_QGA_STARTED", 1.5)
    server = _silent_guest(tmp_path)
    (tmp_path / "console.log").write_text("[  OK  ] Started qemu-guest-agent.service - QEMU Guest Agent.\n"
                                          "Debian GNU/Linux 12 localhost ttyS0\n\nlocalhost login: ")
    with pytest.raises(delivery.GuestTimeout, match="nothing answered within 2 s"):
        _reach(tmp_path, 60, grace=0.2)
    server.close()


def test_a_qemu_ga_started_on_the_console_but_silent_is_waited_for_longer_then_named(tmp_path, monkeypatch):
    monkeypatch.setattr(delivery, "AFTER_LOGIN_GRACE", 0.5)
    monkeypatch.setattr(delivery, "AFTER_LOGIN_GRACE_QGA_STARTED", 1.5)
    server = _silent_guest(tmp_path)
    (tmp_path / "console.log").write_text("[  OK  ] Started qemu-guest-agent.service - QEMU Guest Agent.\n"
                                          "Debian GNU/Linux 12 localhost ttyS0\n\nlocalhost login: ")
    with pytest.raises(delivery.GuestTimeout) as caught:
        _reach(tmp_path, 60)
    message = str(caught.value)
    assert "on the console) and nothing answered within 2 s" in message
    assert "QEMU guest agent started on the guest's console but never answered" in message
    server.close()


def test_multi_user_reached_without_a_serial_login_prompt_counts_as_the_end_of_the_boot(tmp_path, monkeypatch):
    monkeypatch.setattr(delivery, "AFTER_LOGIN_GRACE", 0.5)
    server = _silent_guest(tmp_path)
    (tmp_path / "console.log").write_text("[  OK  ] Reached target \x1b[0;1;39mmulti-user.target\x1b[0m - "
                                          "Multi-User System.\n")
    with pytest.raises(delivery.GuestTimeout, match="multi-user.target on the console. and nothing answered"):
        _reach(tmp_path, 60)
    server.close()


def test_a_first_sector_without_boot_code_is_named_as_unbootable_by_seabios():
    table_only = mbr()                              # a partition table and the signature, no code
    assert "no boot code" in bootmode.bios_boot_problem(bytes(table_only))
    assert "no boot code" in bootmode.bios_boot_problem(bytes(bootmode.HEAD_SECTORS * 512))
    assert bootmode.bios_boot_problem(bytes(mbr(b"\xeb\x63"))) is None

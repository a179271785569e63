"""An image whose cloud-init runs but never reads the job's cidata seed (a site's `datasource_list: [ None ]`
or `[ Ec2 ]`) and that has no other way in fails naming that, from the guest's console, soon after its boot
finished; a cloud-init that did read the seed never gets that error.

The console excerpts are from real boots of the bookworm stock test images (tests/integration/stockimage.py):
`bookworm-bios-cloud-init-no-seed` (datasource_list: [ None ], no qemu-ga) and `bookworm-bios` (the seed read).
"""
import socket
import time
from pathlib import Path

import pytest

from vmloader.bootstrapper import delivery
from vmloader.bootstrapper.agentclient import AgentClient
from vmloader.bootstrapper.console import tail
from vmloader.bootstrapper.errors import GuestTimeout

OK = "[\x1b[0;32m  OK  \x1b[0m]"
INIT_LOCAL = ("[  138.649580] cloud-init[241]: Cloud-init v. 22.4.2 running 'init-local' at Thu, 26 Nov 2026 "
              "09:01:22 +0000. Up 136.12 seconds.\r\n")
INIT = ("[  184.918418] cloud-init[298]: Cloud-init v. 22.4.2 running 'init' at Thu, 26 Nov 2026 09:02:08 +0000. "
        "Up 182.03 seconds.\r\n"
        "[  187.179992] cloud-init[298]: ci-info: |  ens2  | True |         10.0.2.15          | 255.255.255.0 | "
        "global | 52:54:00:2b:5f:e0 |\r\n"
        "[  313.318138] cloud-init[298]: Generating public/private ed25519 key pair.\r\n"
        f"{OK} Finished \x1b[0;1;39mcloud-init.servic\u2026it job (metadata service crawler).\r\r\n"
        f"{OK} Reached target \x1b[0;1;39msysinit.target\x1b[0m - System Initialization.\r\r\n")
LOGIN = ("\r\r\nDebian GNU/Linux 12 localhost ttyS0\r\n\r\nlocalhost login: ")
# What its last stage prints when it gets there (often after the login prompt, under load after the grace).
FINISHED_NONE = ("[  402.113034] cloud-init[612]: Cloud-init v. 22.4.2 finished at Thu, 26 Nov 2026 09:05:41 +0000. "
                 "Datasource DataSourceNone.  Up 401.87 seconds\r\n"
                 "[  402.120581] cloud-init[612]: 2026-11-26 09:05:41,902 - cc_final_message.py[WARNING]: Used "
                 "fallback datasource\r\n")
SEED_READ = (INIT_LOCAL + "[  165.591403] cloud-init[243]: started\r\n"
             f"{OK} Started \x1b[0;1;39mvmloader-agent.ser\u2026usr/bin/python3 -m vmloader.agent.\r\r\n")


def console(tmp_path: Path, text: str) -> str:
    """The console as reach_agent reads it (a file tailed, CRLF made LF)."""
    path = tmp_path / "console.log"
    path.write_bytes(text.encode())
    return tail(path, delivery.CLOUD_INIT_CONSOLE_LINES)


def test_cloud_init_running_without_the_seed_is_recognised_before_it_names_its_datasource(tmp_path):
    assert delivery.cloud_init_ignored_seed(console(tmp_path, INIT_LOCAL + INIT + LOGIN)) == ""


def test_the_datasource_cloud_init_used_instead_is_named_once_its_last_stage_says_it(tmp_path):
    text = console(tmp_path, INIT_LOCAL + INIT + LOGIN + "\r\n" + FINISHED_NONE)
    assert delivery.cloud_init_ignored_seed(text) == "datasource None"
    ec2 = FINISHED_NONE.replace("DataSourceNone", "DataSourceEc2Local")
    assert delivery.cloud_init_ignored_seed(console(tmp_path, INIT_LOCAL + ec2)) == "datasource Ec2Local"


def test_nocloud_from_a_seed_of_the_image_itself_is_not_our_seed(tmp_path):
    baked = FINISHED_NONE.replace("DataSourceNone", "DataSourceNoCloud [seed=/var/lib/cloud/seed/nocloud-net]"
                                                    "[dsmode=net]")
    assert (delivery.cloud_init_ignored_seed(console(tmp_path, INIT_LOCAL + baked))
            == "datasource NoCloud [seed=/var/lib/cloud/seed/nocloud-net][dsmode=net]")


@pytest.mark.parametrize("text", [
    SEED_READ + INIT + LOGIN,                                           # our bootcmd's adopt.sh said "started"
    INIT_LOCAL + "[  166.2] cloud-init[243]: already started\r\n" + LOGIN,   # after qemu-ga's delivery
    INIT_LOCAL + "[  166.2] cloud-init[243]: vmloader: the guest has no python3 (the agent needs python3 >= "
                 "3.6)\r\n" + LOGIN,                                    # read, but adopt.sh could not start it
    INIT_LOCAL + INIT + FINISHED_NONE.replace("DataSourceNone", "DataSourceNoCloud [seed=dmi,/dev/vdb]"
                                                                "[dsmode=net]"),
    "Debian GNU/Linux 12 localhost ttyS0\r\n\r\nlocalhost login: ",      # no cloud-init at all
], ids=["adopt-started", "adopt-already-started", "adopt-failed", "nocloud-read-our-disk", "no-cloud-init"])
def test_a_cloud_init_that_read_the_seed_or_no_cloud_init_is_not_taken_for_one_that_ignored_it(tmp_path, text):
    assert delivery.cloud_init_ignored_seed(console(tmp_path, text)) is None


def test_what_the_guest_says_its_datasource_is_comes_back_escaped_and_bounded(tmp_path):
    hostile = FINISHED_NONE.replace("DataSourceNone.", "DataSourceNone\x1b[2J\x07" + "x" * 500 + ".")
    said = delivery.cloud_init_ignored_seed(console(tmp_path, INIT_LOCAL + hostile))
    assert said is not None and said.startswith("datasource None\\x1b[2J\\x07x")
    assert "\x1b" not in said and len(said.encode()) <= 200


def silent_guest(tmp_path: Path) -> socket.socket:
    """An agent channel nobody answers on, no QGA socket at all."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "agent.sock"))
    server.listen(1)
    return server


def reach(tmp_path: Path) -> GuestTimeout:
    with pytest.raises(GuestTimeout) as caught:
        delivery.reach_agent(tmp_path / "agent.sock", tmp_path / "qga.sock", tmp_path / "console.log",
                             time.monotonic() + 60, lambda sock: AgentClient(sock),
                             lambda why, hint: GuestTimeout(why, hint=hint))
    return caught.value


def test_a_boot_whose_cloud_init_ignored_the_seed_fails_soon_after_its_login_prompt_naming_that(tmp_path,
                                                                                               monkeypatch):
    monkeypatch.setattr(delivery, "AFTER_LOGIN_GRACE", 1.0)
    server = silent_guest(tmp_path)
    console(tmp_path, INIT_LOCAL + INIT + LOGIN + "\r\n" + FINISHED_NONE)
    error = reach(tmp_path)
    assert error.message.startswith("the guest's boot finished (its login prompt")
    assert ("cloud-init ran in the guest but never read vmloader's seed (the `cidata` disk, NoCloud): it used "
            "datasource None; no QEMU guest agent on org.qemu.guest_agent.0") in error.message
    for named in ("datasource_list", "/etc/cloud/cloud.cfg.d", "NoCloud", "/etc/cloud/cloud-init.disabled",
                  "install qemu-guest-agent", "bake vmloader's agent"):
        assert named in (error.hint or "")
    server.close()


def test_a_boot_whose_cloud_init_read_the_seed_keeps_the_error_naming_every_way_looked_for(tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setattr(delivery, "AFTER_LOGIN_GRACE", 1.0)
    server = silent_guest(tmp_path)
    console(tmp_path, SEED_READ + INIT + LOGIN)
    error = reach(tmp_path)
    assert "never read vmloader's seed" not in error.message
    assert "looked for vmloader's agent" in error.message and error.hint == delivery.NO_WAY_IN_HINT
    server.close()


def test_before_the_boot_finished_cloud_init_lines_alone_do_not_say_the_seed_was_ignored(tmp_path):
    server = silent_guest(tmp_path)
    console(tmp_path, INIT_LOCAL)                       # still in its first stage at the boot timeout
    with pytest.raises(GuestTimeout) as caught:
        delivery.reach_agent(tmp_path / "agent.sock", tmp_path / "qga.sock", tmp_path / "console.log",
                             time.monotonic() + 1.5, lambda sock: AgentClient(sock),
                             lambda why, hint: GuestTimeout(why, hint=hint))
    assert "never read vmloader's seed" not in caught.value.message
    assert "within the boot timeout" in caught.value.message
    server.close()

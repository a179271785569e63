"""The agent's own command line (parsed by hand: argparse costs a cold guest's boot time)."""
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vmloader import protocol as P
from vmloader.agent.__main__ import parse_args
from vmloader.agent.server import Agent
from vmloader.agent.transport import SocketTransport

ROOT = Path(__file__).resolve().parents[2]


def test_without_options_the_agent_serves_the_job_channel_as_a_plain_process():
    assert parse_args([]) == (False, P.CHANNEL_NAME)


@pytest.mark.parametrize("argv", [["--pid1", "--port-name", "org.vmloader.agent.2"],
                                  ["--port-name=org.vmloader.agent.2", "--pid1"]])
def test_pid1_and_a_port_name_are_read_in_either_order_and_either_spelling(argv):
    assert parse_args(argv) == (True, "org.vmloader.agent.2")


@pytest.mark.parametrize("argv", [["--bogus"], ["--port-name"], ["--port-name="], ["extra"]])
def test_a_bad_command_line_exits_2_naming_the_problem(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "usage: vmloader-agent" in err and "error:" in err


def test_help_prints_the_usage_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--help"])
    assert exited.value.code == 0
    assert "--port-name NAME" in capsys.readouterr().out


def test_the_agent_starts_without_importing_argparse_platform_or_runpy():
    """What vmloader-init runs: those modules would cost a cold TCG boot about 0.2 s."""
    init = (ROOT / "vmloader/agent/vmloader-init").read_text()
    code = init.split("exec python3 -c '", 1)[1].split("'", 1)[0]
    probe = code.replace("main()", "import sys; print(sorted({'argparse', 'platform', 'runpy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-S", "-c", probe], cwd=str(ROOT), stdout=subprocess.PIPE,
                         universal_newlines=True, check=True, env={"PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "[]"


def test_hello_names_the_guests_python_and_kernel_as_platform_would(tmp_path):
    host, guest = socket.socketpair()
    try:
        hello = Agent(SocketTransport(guest), workdir=str(tmp_path)).info()
    finally:
        host.close()
        guest.close()
    assert (hello.python, hello.kernel) == (platform.python_version(), platform.release())

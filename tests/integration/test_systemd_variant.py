"""The systemd-booting image variant: the agent runs as a unit, services are available."""
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftovers")]


def test_the_systemd_variant_boots_systemd_and_runs_the_job_through_the_agent_unit(vmloader):
    built = vmloader("images", "build", "debian-12", "--init", "systemd", timeout=1200)
    assert built.returncode == 0, built.err
    assert built.out.startswith("debian-12-systemd@")
    run = vmloader("run", "--image", "debian-12-systemd", "--snapshot", "never", "--",
                   "sh", "-c", "cat /proc/1/comm; id -u")
    assert run.returncode == 0, run.err
    assert run.out.split() == ["systemd", "1000"]

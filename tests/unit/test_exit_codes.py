import pytest

from vmloader.bootstrapper.agentclient import ExecResult
from vmloader.bootstrapper.errors import UsageError
from vmloader.bootstrapper.job import JobSpec, exit_status, outcome_of, validate


@pytest.mark.parametrize("result, status", [
    (ExecResult(0, None, None), 0),
    (ExecResult(7, None, None), 7),
    (ExecResult(None, 9, None), 137),
    (ExecResult(None, 15, None), 143),
    (ExecResult(None, None, "not_found"), 127),
    (ExecResult(None, None, "not_executable"), 126),
    (ExecResult(None, None, "spawn_failed"), 125),
])
def test_exit_status_follows_docker_run(result, status):
    assert exit_status(result) == status


def test_outcomes_name_each_kind_of_end():
    assert [outcome_of(s) for s in (0, 1, 124, 125, 126, 127, 137)] == [
        "succeeded", "failed", "timeout", "infrastructure-error", "not-executable", "not-found",
        "killed-by-signal"]


@pytest.mark.parametrize("outputs", [("/etc/passwd",), ("../x",), ("a/../../b",)])
def test_output_paths_escaping_the_work_dir_are_refused_before_boot(outputs):
    with pytest.raises(UsageError, match="escapes"):
        validate(JobSpec(image="debian-12", command=("true",), outputs=outputs))


def test_missing_input_file_is_refused_before_boot(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        validate(JobSpec(image="debian-12", command=("true",), inputs=(str(tmp_path / "nope"),)))


def test_an_empty_command_is_a_usage_error():
    with pytest.raises(UsageError, match="no command"):
        validate(JobSpec(image="debian-12", command=()))

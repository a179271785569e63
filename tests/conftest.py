from pathlib import Path

import pytest

from tests.watchdog import (pytest_configure, pytest_runtest_makereport,  # noqa: F401 (hooks)
                            pytest_runtest_protocol)

GOLDEN = Path(__file__).parent / "unit" / "golden"


def pytest_addoption(parser):
    parser.addoption("--regen-golden", action="store_true",
                     help="rewrite tests/unit/golden/* from the current output instead of comparing")


@pytest.fixture
def golden(request):
    """golden(name, text): compare `text` to the saved golden file (or rewrite it with --regen-golden)."""
    def check(name: str, text: str) -> None:
        path = GOLDEN / name
        if request.config.getoption("--regen-golden"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return
        assert path.exists(), f"no golden file {path}: run pytest --regen-golden once and review it"
        assert text == path.read_text()
    return check

"""The agent runs under whatever Python 3 a guest has: keep it 3.6-syntax and stdlib-only."""
import ast
import sys
from pathlib import Path

import pytest

import vmloader

PACKAGE = Path(vmloader.__file__).parent
GUEST_FILES = [PACKAGE / "__init__.py", PACKAGE / "protocol.py", *sorted((PACKAGE / "agent").glob("*.py"))]


@pytest.mark.parametrize("path", GUEST_FILES, ids=lambda p: p.name)
def test_guest_code_parses_as_python_3_6(path):
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 6))


@pytest.mark.parametrize("path", GUEST_FILES, ids=lambda p: p.name)
def test_guest_code_imports_only_the_stdlib_and_the_protocol(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:          # relative: only within the guest-side files
                assert node.module in (None, "protocol", "pid1", "server", "transport"), node.module
                continue
            names = [node.module]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in sys.stdlib_module_names, f"{path.name} imports {name}"


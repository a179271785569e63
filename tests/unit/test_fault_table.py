"""docs/reliability.md's fault table and the registered faults (tests/integration/faulttable.py
FAULTS) say the same: no row for an unregistered fault, no registered fault without a row.

When this fails after adding a fault: run its test (it records the row) and write the table
with scripts/fault-table; after removing or renaming one, scripts/fault-table drops the old row.
"""
import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"


def load_faulttable(results: Path):
    """A fresh copy of the module, writing its rows to `results` (never the shared file)."""
    import os
    old = os.environ.get("VMLOADER_FAULT_RESULTS")
    os.environ["VMLOADER_FAULT_RESULTS"] = str(results)
    try:
        spec = importlib.util.spec_from_file_location("faulttable_under_test",
                                                      ROOT / "tests" / "integration" / "faulttable.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        if old is None:
            del os.environ["VMLOADER_FAULT_RESULTS"]
        else:
            os.environ["VMLOADER_FAULT_RESULTS"] = old


@pytest.fixture
def faulttable(tmp_path):
    return load_faulttable(tmp_path / "results.jsonl")


def table_faults() -> list:
    _, _, rest = DOC.read_text().partition(BEGIN)
    body, found, _ = rest.partition(END)
    assert found, f"{DOC} has no {BEGIN} ... {END} table"
    return [line.split(" | ")[0].lstrip("| ").strip().replace("\\|", "|")
            for line in body.strip().splitlines()[2:]]


def test_every_row_of_the_table_is_a_registered_fault(faulttable):
    unregistered = [fault for fault in table_faults() if faulttable.registered(fault) is None]
    assert not unregistered, (f"rows in {DOC.name} for faults not in faulttable.FAULTS: {unregistered}; "
                              "register them, or rewrite the table with scripts/fault-table")


def test_every_registered_fault_has_a_row(faulttable):
    rows = table_faults()
    missing = [name for name in faulttable.FAULTS if not any(faulttable.registered(r) == name for r in rows)]
    assert not missing, (f"registered faults without a row in {DOC.name}: {missing}; run their tests and "
                         "write the table with scripts/fault-table")


def test_registered_names_are_distinct_and_unambiguous(faulttable):
    assert len(set(faulttable.FAULTS)) == len(faulttable.FAULTS)
    for name in faulttable.FAULTS:
        assert faulttable.registered(name) == name


def test_record_row_refuses_an_unregistered_fault_and_writes_a_registered_one(faulttable, tmp_path):
    with pytest.raises(ValueError, match="not in faulttable.FAULTS"):
        faulttable.record_row("a fault nobody registered", 125, "infrastructure-error", "exec", "", "")
    faulttable.record_row("4 concurrent jobs on 8 cores", 0, "succeeded", "", "", "each job's output")
    assert "4 concurrent jobs on 8 cores" in (tmp_path / "results.jsonl").read_text()


def literal_fault_names() -> list:
    """Fault names written as plain strings in record()/record_row() calls of the integration tests."""
    names = []
    for path in sorted((ROOT / "tests" / "integration").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("record", "record_row")):
                continue
            args = [node.args[0]] if node.args else []
            args += [k.value for k in node.keywords if k.arg == "fault"]
            args += [v for k in node.keywords if k.arg is None and isinstance(k.value, ast.Dict)
                     for key, v in zip(k.value.keys, k.value.values)
                     if isinstance(key, ast.Constant) and key.value == "fault"]
            names += [(path.name, a.value) for a in args if isinstance(a, ast.Constant)]
    return names


def test_the_integration_tests_record_registered_names(faulttable):
    names = literal_fault_names()
    assert names, "found no record()/record_row() calls: did the tests move?"
    unknown = [(where, name) for where, name in names if faulttable.registered(name) is None]
    assert not unknown, f"recorded under names not in faulttable.FAULTS: {unknown}"

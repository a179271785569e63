"""Rows of the fault table in docs/reliability.md, recorded by the fault tests as they run.

Every fault test, in any module, calls `record_row` with its outcome. Rows go to a
JSON-lines file outside the checkout (VMLOADER_FAULT_RESULTS, default under /var/tmp);
the table in docs/reliability.md is written from it by its own step, never by a test.
"""
import json
import os
from pathlib import Path

RESULTS = Path(os.environ.get("VMLOADER_FAULT_RESULTS", "/var/tmp/vmloader-fault-results.jsonl"))


def record_row(fault: str, exit: object, outcome: str, phase: str, message: str, kept: str) -> None:
    row = {"fault": fault, "exit": exit, "outcome": outcome, "phase": phase or "", "message": message,
           "kept": kept}
    with open(RESULTS, "a") as out:
        out.write(json.dumps(row) + "\n")


def record(fault: str, result: dict, kept: str) -> None:
    """A row from a `vmloader run --json` result."""
    error = result.get("error") or {}
    record_row(fault, result["exit_status"], result["outcome"], error.get("phase") or "",
               error.get("message", ""), kept)

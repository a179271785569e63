"""Rows of the fault table in docs/reliability.md, recorded by the fault tests as they run.

Every fault test, in any module, calls `record_row` with its outcome. Rows go to a
JSON-lines file outside the checkout (VMLOADER_FAULT_RESULTS, default under /var/tmp);
the table in docs/reliability.md is written from it by its own step, never by a test.
"""
import json
import os
import re
from pathlib import Path
from typing import Optional

RESULTS = Path(os.environ.get("VMLOADER_FAULT_RESULTS", "/var/tmp/vmloader-fault-results.jsonl"))

# Every fault the table has a row for, in the table's order: a test records its row under one
# of these names, and record_row refuses any other. A {placeholder} stands for something
# measured at run time (a core count). To add a fault: add its name here (anywhere: the table
# follows this order), record it from its test, and write the table from a run
# (scripts/fault-table); tests/unit/test_fault_table.py fails while this list and the table differ.
FAULTS = (
    # a VM dies or hangs under a running job (test_faults.py)
    "QEMU process killed (SIGKILL) mid-job",
    "guest kernel panic mid-job",
    "agent process killed in the guest",
    "guest hangs hard (agent stopped: no heartbeat)",
    "libvirtd restarted mid-job",
    "job forks a daemon that outlives the command",
    # malformed HTCondor job ads
    "job ad `+VMImage = 42`",
    'job ad `+VMLoaderRoot = "yes"`',
    'job ad with an unknown snapshot policy (`+VMLoaderSnapshot = "sometimes"`)',
    "job ad with a request_memory too small for any VM (`request_memory = 200 + 100`)",
    "job ad with a request_disk too small for any VM (`request_disk = 1MB`)",
    "an HTCondor VM job writes past its request_disk (`request_disk = 200MB`, 2000 MiB written)",
    "an HTCondor job's cgroup memory limit below its VM (400 MiB on the pool's base cgroup)",
    # repositories and the image cache
    "repository unreachable, image not cached",
    "repository unreachable, image cached",
    "truncated disk image in the repository",
    "bit-flipped disk image in the repository",
    "bit-flipped disk image already in the cache (repository down)",
    "truncated disk image already in the cache (repository up)",
    "host disk fills during an image download",
    "host disk fills under a job's overlay (ext4, 96 MiB)",
    # output, stage-out, job ids, concurrency
    "command writes 1 GiB to stdout",
    "stage-out name with `..` (`--output ../escaped`)",
    "hostile stage-out: symlinks to /etc/shadow and /dev/zero in /work, a host symlink planted in the output dir",
    "two jobs with the same job id (same job dir) at once",
    "4 concurrent jobs on {cores} cores",
    # warm starts (a job restores a saved, booted state of its image)
    "warm state's saved memory bit-flipped",
    "warm state's saved memory truncated",
    "warm state deleted (files and lock) after a job took it, before its restore",
    "the cache disk fills while a warm state is saved (tmpfs, 40 MiB)",
    "a restored warm state whose agent does not answer (saved with its agent stopped)",
    "root (qemu:///system) and a user (qemu:///session) warming the same image",
    "vmloader killed (SIGKILL) while it builds a warm state",
    "vmloader stopped (SIGTERM: condor_rm) while it builds a warm state",
    # a hostile agent in a real guest
    "hostile agent (a root job replaces it in the guest): offers `../escaped`, `/etc/cron.d/evil`, "
    "`sub/../../x` as new outputs",
    "hostile agent (a root job replaces it in the guest): a never-ending file transfer",
    "hostile agent (a root job replaces it in the guest): a frame with a bad checksum",
    "hostile agent (a root job replaces it in the guest): a frame header claiming 2 GiB",
    "hostile agent (a root job replaces it in the guest): data for a request id the host never used",
    "hostile agent (a root job replaces it in the guest): a frame of an unknown type",
    # hostile neighbours on a shared worker, hostile guests (issue 10)
    "guest text with ESC, CR, NUL and 10 KiB in a hold reason",
    "guest escape sequences in the console log",
    "snapshot diff of a guest disk: parsers run without root",
    "another local user connects to a forwarded port of a booted snapshot",
    "a cache user plants a symlink in the shared cache",
    "a user's images add shadows a shared image name",
    "a crafted pickle row in the shared cache's index",
    "a forged stamp over a changed cached artifact",
    "symlinks planted for the cache's write paths (.part, lock, stamp, manifest)",
    "another local user reads a running job's files (path from `ps`): root's job",
    "another local user reads a finished job's record and snapshot: root's job",
    "another local user reads a running job's files (path from `ps`): an unprivileged user's job",
    "another local user reads a finished job's record and snapshot: an unprivileged user's job",
    "a guest writes .chirp.config, .job.ad and _condor_stdout as new outputs (--output-new)",
    "a guest writes .chirp.config, .job.ad and _condor_stdout into an HTCondor job's sandbox",
    # stock images (issue 12)
    "a stock image with neither qemu-guest-agent nor cloud-init (and no vmloader agent)",
    "a stock image whose qemu-ga has guest-exec blocked by its config (and no cloud-init)",
    "a stock image with qemu-guest-agent and no python3",
    "a stock image whose cloud-init never reads the seed (`datasource_list: [ None ]`), and no qemu-guest-agent",
    "a disk that is neither qcow2 nor raw (vmdk), at `images add`",
    "a disk with an MBR partition table and no boot code (`images add --boot bios`)",
    'a disk SeaBIOS finds nothing to boot on (boot code, no boot signature): "No bootable device"',
    "a worker without mtools: the cloud-init seed cannot be made",
    "a UEFI image on a worker without OVMF",
)


def _pattern(name: str) -> "re.Pattern":
    return re.compile(".+?".join(re.escape(part) for part in re.split(r"\{\w+\}", name)))


def registered(fault: str) -> Optional[str]:
    """The FAULTS entry a recorded fault name is an instance of, or None."""
    return next((name for name in FAULTS if _pattern(name).fullmatch(fault)), None)


def record_row(fault: str, exit: object, outcome: str, phase: str, message: str, kept: str) -> None:
    if registered(fault) is None:
        raise ValueError(f"fault {fault!r} is not in faulttable.FAULTS: add it there (the table's rows)")
    row = {"fault": fault, "exit": exit, "outcome": outcome, "phase": phase or "", "message": message,
           "kept": kept}
    with open(RESULTS, "a") as out:
        out.write(json.dumps(row) + "\n")


def record(fault: str, result: dict, kept: str) -> None:
    """A row from a `vmloader run --json` result."""
    error = result.get("error") or {}
    record_row(fault, result["exit_status"], result["outcome"], error.get("phase") or "",
               error.get("message", ""), kept)

"""HTCondor at a site, on a real pool (htcondor 23.9 in a trixie chroot, a pool of its own beside
test_condor.py's): a job's VM sized by its slot and kept within it (its cgroup's memory limit and
accounting, two full slots at once), fifty short jobs leaving nothing beyond retention, and a stock
image root added to the worker's shared cache."""
import filecmp
import json
import re
import shutil
from pathlib import Path

import classad2
import pytest

from .condor_jobs import (COMPLETED, HELD, RUNNING, Submission, held_true_job, kept_warm_on_vm2, ssh_to_job,
                          wait_for_no_leftovers)
from .condor_pool import USER
from .faulttable import record_row

pytestmark = [pytest.mark.integration, pytest.mark.condor]


def guest_mem_total_mib(text: str) -> float:
    return int(re.search(r"^MemTotal:\s+(\d+) kB", text, re.M).group(1)) / 1024


def test_the_vm_is_sized_by_the_evaluated_request_memory_less_qemus_overhead(pool):
    from vmloader.bootstrapper.condor import QEMU_OVERHEAD_MIB
    memtotal = ("executable = /bin/sh\narguments = \"-c 'cat /proc/meminfo'\"\ntransfer_executable = false\n"
                "should_transfer_files = YES\nlog = log\noutput = out\nerror = err\n+VMImage = \"debian-12\"\n")
    # An expression, evaluated against the machine ad (the test pool's startds have 3072 MiB) ...
    expr = Submission(pool, "sizing-expr", {"job.sub": (
        memtotal + "request_memory = ifThenElse(TARGET.TotalMemory >= 3072, 600 + 2 * 100, 2000)\nqueue\n")})
    # ... and none: the transform's default, the image's 1024 MiB plus QEMU's overhead.
    default = Submission(pool, "sizing-default", {"job.sub": memtotal + "queue\n"})
    for job in (expr, default):
        job.submit("job.sub")
    raw = pool.run(["condor_q", str(default.cluster), "-af:r", "RequestMemory"], user=None, check=True).stdout
    assert classad2.ExprTree(raw.strip()).eval() == 1024 + QEMU_OVERHEAD_MIB, raw
    for job, guest_ram in ((expr, 800 - QEMU_OVERHEAD_MIB), (default, 1024)):
        done = job.wait({COMPLETED, HELD}, timeout=900)[0]
        assert done["JobStatus"] == str(COMPLETED) and done["ExitCode"] == "0", (done, job.file("err").read_text())
        total = guest_mem_total_mib(job.file("out").read_text())
        # MemTotal is the guest's RAM less what its kernel reserved for itself (tens of MiB).
        assert guest_ram - 80 < total <= guest_ram, (job.dir, total, guest_ram)


def test_a_request_memory_too_small_for_a_vm_is_held_naming_both_numbers(pool):
    from vmloader.bootstrapper.condor import MIN_GUEST_MEMORY_MIB, QEMU_OVERHEAD_MIB
    job, reason = held_true_job(pool, "toosmall", "request_memory = 300\n")
    need = MIN_GUEST_MEMORY_MIB + QEMU_OVERHEAD_MIB
    assert "request_memory 300 MiB is too small for a VM of debian-12" in reason, reason
    assert f"at least {need} MiB" in reason and "[job ad]" in reason, reason
    pool.run(["condor_rm", str(job.cluster)], check=True)


def test_a_vm_jobs_memory_and_cpu_are_accounted_to_it_through_its_cgroup(pool):
    """QEMU, started by the job's private libvirt session daemon, runs in the job's cgroup: the
    guest filling 600 MiB of its RAM shows in MemoryUsage, its CPU in RemoteUserCpu."""
    from .condor_pool import base_cgroup
    job = Submission(pool, "accounting", {
        "fill.sh": "#!/bin/sh\npython3 -c 'import time; b = b\"x\" * (600 << 20); print(\"filled\", flush=True); "
                   "time.sleep(30)'\n",
        "job.sub": ("executable = fill.sh\nshould_transfer_files = YES\noutput = out\nerror = err\nlog = log\n"
                    '+VMImage = "debian-12"\n+VMLoaderSnapshot = "never"\nqueue\n')})
    job.file("fill.sh").chmod(0o755)
    job.submit("job.sub")
    jobs_dir = pool.path(f"/home/{USER}/.local/share/vmloader/jobs")
    running = lambda: [d for d in jobs_dir.glob(f"condor-{job.cluster}.0-*")
                       if (d / "phase").exists() and (d / "phase").read_text().strip() == "exec"]
    job_dir = pool.wait_for(running, 600, "the VM job to reach its exec phase")[0]
    cgroup = job_memory_cgroup(pool, job_dir)                # (a process may end while we look)
    assert cgroup.relative_to("/sys/fs/cgroup/memory").parts[0] == base_cgroup(pool.port), cgroup  # the job's
    done = job.wait({COMPLETED}, timeout=900)[0]
    assert done["ExitCode"] == "0", job.file("err").read_text()
    assert job.file("out").read_text() == "filled\n"
    usage = pool.run(["condor_history", str(job.cluster), "-af", "MemoryUsage", "RemoteUserCpu"], user=None,
                     check=True).stdout.split()
    memory_mib, user_cpu = int(usage[0]), float(usage[1])
    assert memory_mib >= 600, usage
    assert user_cpu > 0, usage


def test_fifty_short_vm_jobs_leave_no_daemons_sockets_or_records_beyond_retention(pool):
    """The per-job libvirt session daemons and their sockets go with each job; job records and
    snapshots stay within the retention settings (snapshot_max_count, 20 by default). Every job
    restores a warm state, one after another on each slot (one lane: one slot): on vm2 the one its
    cache service keeps, on vm1 the one root built there with `images warm` (as a site's STARTD_CRON
    or admin would). (Jobs that boot are the rest of this module's and test_condor's.)"""
    from vmloader.bootstrapper.config import Config
    kept_warm_on_vm2(pool)
    pool.warm("debian-12", "/var/cache/vmloader-1")
    job = Submission(pool, "fifty", {"job.sub": (
        "executable = /bin/true\ntransfer_executable = false\nshould_transfer_files = YES\nlog = log\n"
        '+VMImage = "debian-12"\n+VMLoaderSnapshot = "always"\nqueue 50\n')})
    job.submit("job.sub")
    done = job.wait({COMPLETED}, count=50, timeout=3600)
    assert sorted(j["ExitCode"] for j in done.values()) == ["0"] * 50
    wait_for_no_leftovers(pool)
    state = pool.path(f"/home/{USER}/.local/share/vmloader")
    keep = Config.__dataclass_fields__["snapshot_max_count"].default      # the worker config sets no other
    # (a job prunes the records of finished jobs, never its own nor one still running: the last jobs
    # of the two slots, ending at once, each leave the other's record and their own till the next)
    assert len(list((state / "jobs").iterdir())) <= keep + 2
    kept = list((state / "snapshots").iterdir())
    assert len(kept) <= keep
    worker_of = {Path(j["VMLoaderSnapshot"].partition(":")[2]).name: j["LastRemoteHost"].split("@")[1]
                 for j in done.values()}
    starts = {}
    for snapshot in kept:
        timings = json.loads((snapshot / "metadata.json").read_text())["timings"]
        starts.setdefault(worker_of[snapshot.name], set()).add("warm" if "restore" in timings else "cold")
    assert starts == {"vm1": {"warm"}, "vm2": {"warm"}}, starts


def test_a_vm_that_would_outgrow_its_jobs_cgroup_memory_limit_is_held_with_the_numbers(pool):
    """QEMU runs in the job's cgroup, so its memory limit (here set on the pool's base cgroup,
    an ancestor of every job's) bounds the VM as the slot does: a limit no VM fits in is a hold
    naming it, never a VM the kernel OOM-kills."""
    from .condor_pool import base_cgroup
    base = Path("/sys/fs/cgroup/memory", base_cgroup(pool.port))
    if not base.is_dir():
        pytest.skip("no cgroup v1 memory controller for the pool")
    limit = base / "memory.limit_in_bytes"
    limit.write_text(str(400 * 2 ** 20))
    try:
        job, reason = held_true_job(pool, "cgrouplimit", "")
    finally:
        limit.write_text("-1")
    assert "request_memory 1216 MiB (the job's cgroup memory limit 400 MiB) is too small for a VM of debian-12" \
        in reason, reason
    pool.run(["condor_rm", str(job.cluster)], check=True)
    record_row("an HTCondor job's cgroup memory limit below its VM (400 MiB on the pool's base cgroup)", 125,
               "held (HoldReason, subcode 125)", "job ad", reason, "the job (on hold); no VM started")


def job_memory_cgroup(pool, job_dir: Path) -> Path:
    """The host's memory cgroup dir of the job whose VM runs from `job_dir` (its QEMU's cgroup)."""
    def qemu():
        return next((pid for pid, cmdline in pool.command_lines().items()
                     if job_dir.name in cmdline and "qemu" in cmdline), None)
    pid = pool.wait_for(qemu, 120, f"the QEMU of {job_dir.name}")
    line = next(line for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if ":memory:" in line)
    return Path("/sys/fs/cgroup/memory") / line.split(":", 2)[2].lstrip("/")


def test_two_slots_running_vm_jobs_at_once_never_hold_more_than_their_two_requests(pool):
    """One cluster of two VM jobs, one per slot, both guests holding most of their RAM at the same
    time (each fills 640 MiB of its 832 and waits for a `go` the test gives through condor_ssh_to_job
    once both have filled). The cgroups' high-water marks, read while both jobs exist, and HTCondor's
    own peak (ResidentSetSize_RAW, from the cgroup) stay within each job's request (its slot's
    Memory); what the pool's peak with both VMs full adds to what it held before, within the sum of
    the two."""
    from .condor_pool import base_cgroup
    if not Path("/sys/fs/cgroup/memory").is_dir():
        pytest.skip("no cgroup v1 memory controller for the pool")
    base = Path("/sys/fs/cgroup/memory", base_cgroup(pool.port))
    base.mkdir(exist_ok=True)              # (HTCondor makes it with the pool's first job; the pool removes it)
    mib = 2 ** 20
    fill_mib, request_mib = 640, 1024
    job = Submission(pool, "twoslots", {
        "fill.sh": "#!/bin/sh\nexec python3 -c '\nimport os, time\n"
                   f"b = b\"x\" * ({fill_mib} << 20)\nopen(\"filled\", \"w\").close()\n"
                   "while not os.path.exists(\"go\"):\n    time.sleep(1)\n'\n",
        "job.sub": ("executable = fill.sh\nshould_transfer_files = YES\noutput = out$(Process)\n"
                    f"error = err$(Process)\nlog = log\nrequest_memory = {request_mib}\n"
                    '+VMImage = "debian-12"\n+VMLoaderSnapshot = "never"\nqueue 2\n')})
    job.file("fill.sh").chmod(0o755)
    wait_for_no_leftovers(pool)                  # no VM of an earlier test still in the pool's cgroup
    (base / "memory.max_usage_in_bytes").write_text("0")      # the pool's peak from here on: these two jobs
    # ... over what the pool already holds: its daemons, and page cache and tmpfs files of the tests
    # before (once 2238 MiB at the peak against the 2048 of the two requests, with the baseline in it)
    baseline = int((base / "memory.usage_in_bytes").read_text())
    job.submit("job.sub")
    ids = [f"{job.cluster}.{proc}" for proc in (0, 1)]
    jobs_dir = pool.path(f"/home/{USER}/.local/share/vmloader/jobs")
    try:
        job.wait({RUNNING}, count=2)
        # Both guests filled and waiting: from here to `go` both VMs run, full, at the same time.
        for vm_job in ids:
            pool.wait_for(lambda: ssh_to_job(pool, job, "-auto-retry", vm_job, "--", "test -e filled").returncode == 0,
                          900, f"job {vm_job}'s guest to fill its RAM", 3)
        both_full = int((base / "memory.max_usage_in_bytes").read_text())
        seen = {}
        for vm_job in ids:
            job_dir = pool.wait_for(lambda: list(jobs_dir.glob(f"condor-{vm_job}-*")), 60, f"{vm_job}'s record")[0]
            cgroup = job_memory_cgroup(pool, job_dir)
            slot = pool.run(["condor_status", "-constraint", f'JobId == "{vm_job}"', "-af", "Name", "Memory"],
                            user=None, check=True).stdout.split()
            seen[vm_job] = {"slot": slot[0], "slot_mib": int(slot[1]), "cgroup": cgroup.name,
                            "limit": int((cgroup / "memory.limit_in_bytes").read_text()),
                            "peak": int((cgroup / "memory.max_usage_in_bytes").read_text())}
        for vm_job in ids:
            ssh_to_job(pool, job, vm_job, "--", "touch go")
        done = job.wait({COMPLETED}, count=2, timeout=900)
    finally:
        pool.run(["condor_rm", str(job.cluster)], user=None)
    assert sorted(j["ExitCode"] for j in done.values()) == ["0", "0"], seen
    assert len({s["slot"] for s in seen.values()}) == 2, seen            # two slots, one VM each
    for vm_job, s in seen.items():
        assert s["slot_mib"] == request_mib and s["limit"] == request_mib * mib, seen  # the slot is the request
        assert fill_mib * mib <= s["peak"] <= s["limit"], seen           # the guest's RAM is in it, within it
    assert 2 * fill_mib * mib <= both_full and both_full - baseline <= 2 * request_mib * mib, (both_full, baseline,
                                                                                           seen)
    # HTCondor's own figure: the job's peak from its cgroup, in KiB (ResidentSetSize_RAW); the execute config's
    # MEMORY_USAGE_METRIC makes MemoryUsage from it (from ResidentSetSize, rounded up, 988 MiB showed 1221).
    usage = pool.run(["condor_history", str(job.cluster), "-af", "ProcId", "ResidentSetSize_RAW", "RequestMemory",
                      "MemoryUsage"], user=None, check=True).stdout
    figures = {int(p): (int(kib), int(r), m) for p, kib, r, m in (line.split() for line in usage.splitlines())}
    assert sorted(figures) == [0, 1], usage
    for peak_kib, requested, memory_usage in figures.values():
        assert fill_mib * 1024 <= peak_kib <= requested * 1024 and requested == request_mib, figures
        assert fill_mib <= int(memory_usage) <= requested, figures    # what HOLD_IF_MEMORY_EXCEEDED compares
    assert sum(f[0] for f in figures.values()) <= sum(f[1] for f in figures.values()) * 1024, figures
    print(f"two slots: cgroup peaks {[s['peak'] // mib for s in seen.values()]} MiB of "
          f"{[s['limit'] // mib for s in seen.values()]}; both full together {both_full // mib} MiB "
          f"(the pool held {baseline // mib} MiB before); "
          f"ResidentSetSize_RAW, RequestMemory, MemoryUsage {figures}")


def test_a_job_naming_a_stock_image_root_added_runs_as_the_user_with_the_agent_delivered_at_boot(pool):
    """+VMImage naming a distribution-style cloud image (grub in the MBR, systemd, cloud-init,
    qemu-guest-agent; no vmloader file) that root added to the worker's shared cache: the job's
    user runs it through qemu:///session, the agent comes with cloud-init and is remembered for the
    user's next job of the image, nothing is left."""
    from . import stockimage
    built = stockimage.build(stockimage.BOOKWORM_BIOS)
    inside = "/var/tmp/stock-bookworm.qcow2"
    shutil.copyfile(built, pool.path(inside))
    for cache in ("/var/cache/vmloader-1", "/var/cache/vmloader-2"):    # wherever the job lands
        added = pool.vmloader("images", "add", "stock-bookworm", "--disk", inside, "--json", user="root",
                              cache=cache, timeout=900)
        assert added.returncode == 0, added.stderr
        entry = json.loads(added.stdout)
        assert entry["boot"] == "bios"
        before = entry["artifacts"]["disk"]["sha256"]
    pool.path(inside).unlink()
    script = ("id -u; . /etc/os-release; echo $VERSION_CODENAME; cat input.txt; echo to-stderr >&2; "
              "echo made-in-the-stock-vm > result.txt; exit 4")
    job = Submission(pool, "stockjob", {"input.txt": "from the submit dir\n", "job.sh": f"#!/bin/sh\n{script}\n",
                                        "job.sub": (
        "executable = job.sh\ntransfer_input_files = input.txt\nshould_transfer_files = YES\n"
        "when_to_transfer_output = ON_EXIT\noutput = out\nerror = err\nlog = log\n"
        # A stock image boots its firmware, grub, systemd and cloud-init: minutes under TCG on a
        # loaded host, so a generous boot timeout (a site sets boot_timeout in its config).
        'environment = "VMLOADER_BOOT_TIMEOUT=1500"\n'
        '+VMImage = "stock-bookworm"\n+VMLoaderSnapshot = "never"\nqueue\n')})
    job.file("job.sh").chmod(0o755)
    job.submit("job.sub")
    done = job.wait({COMPLETED, HELD}, timeout=1800)[0]
    assert done["JobStatus"] == str(COMPLETED), (done, job.file("err").read_text())
    assert done["ExitCode"] == "4", job.file("err").read_text()
    uid, codename, line = job.file("out").read_text().split("\n")[:3]
    assert int(uid) >= 60000 and codename == "bookworm" and line == "from the submit dir"
    assert "to-stderr" in job.file("err").read_text()
    assert job.file("result.txt").read_text() == "made-in-the-stock-vm\n"
    jobs_dir = pool.path(f"/home/{USER}/.local/share/vmloader/jobs")
    job_dir = pool.wait_for(lambda: list(jobs_dir.glob(f"condor-{job.cluster}.0-*")), 60, "the job's record")[0]
    meta = json.loads((job_dir / "metadata.json").read_text())
    assert meta["agent_delivery"] == "cloud-init" and meta["agent_delivery_remembered"] is False, meta
    # ... and remembered in the user's own state dir, where the user's next job of the image reads it
    # (that the next job then goes this way alone is checked where a snapshot of a stock image reopens).
    record = pool.path(f"/home/{USER}/.local/share/vmloader/deliveries/{before}")
    assert record.read_text() == "cloud-init\n" and record.stat().st_mode & 0o022 == 0
    assert not [p.name for p in job_dir.iterdir() if p.name in ("overlay.qcow2", "cidata.img", "nvram.fd")]
    wait_for_no_leftovers(pool)
    for cache in ("/var/cache/vmloader-1", "/var/cache/vmloader-2"):
        assert filecmp.cmp(pool.path(cache) / "artifacts" / before, built, shallow=False)      # the base untouched

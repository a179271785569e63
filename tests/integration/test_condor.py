"""HTCondor jobs with +VMImage run in VMs, on a real pool (htcondor 23.9 in a trixie chroot): the startd
ads and ranks, the sandbox, holds, platform matrices and DAGs, stopping jobs, condor_ssh_to_job and
request_disk. What a job's VM takes of its slot and leaves on the worker is in test_condor_site.py."""
import hashlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import htcondor2
import pytest

from .condor_jobs import (COMPLETED, EXAMPLES, HELD, IDLE, REMOVED, RUNNING, Submission, WARM_ADVERTISED, fields,
                          held_true_job, kept_warm_on_vm2, ssh_to_job, wait_for_no_leftovers)
from .condor_pool import IMAGES, USER
from .faulttable import record_row

pytestmark = [pytest.mark.integration, pytest.mark.condor]


def test_startd_ads_advertise_vmloader_and_a_job_prefers_the_worker_with_its_image_cached(pool):
    ads = pool.run(["condor_status", "-af:t", "Name", "VMLoader", "VMLoaderHypervisors", "VMLoaderVersion",
                    "VMLoaderCacheFreeBytes", "VMLoaderCacheDir"], user=None, check=True).stdout
    rows = [line.split("\t") for line in ads.splitlines()]
    assert len(rows) == 2
    for name, flag, hypervisors, version, free, cache in rows:
        assert flag == "true" and "qemu" in hypervisors.split(",") and version and int(free) > 0
    assert sorted(r[5] for r in rows) == ["/var/cache/vmloader-1", "/var/cache/vmloader-2"]
    # debian-11 cached on vm2 only: the job's rank sends it there.
    for cache in ("/var/cache/vmloader-1", "/var/cache/vmloader-2"):
        pool.vmloader("images", "rm", "debian-11", cache=cache, user="root")   # the caches' one writer
    pool.vmloader("images", "pull", "debian-11", cache="/var/cache/vmloader-2", check=True, timeout=600)
    pool.wait_for(lambda: "debian-11" in pool.run(
        ["condor_status", "-constraint", 'VMLoaderCacheDir == "/var/cache/vmloader-2"', "-af", "VMLoaderImages"], user=None).stdout,
        120, "vm2's probe to advertise debian-11")
    pool.wait_for(lambda: "debian-11" not in pool.run(
        ["condor_status", "-constraint", 'VMLoaderCacheDir == "/var/cache/vmloader-1"', "-af", "VMLoaderImages"],
        user=None).stdout, 120, "vm1's probe to stop advertising debian-11")
    job = Submission(pool, "rank", {"job.sub": (
        "executable = /bin/cat\narguments = /etc/debian_version\ntransfer_executable = false\n"
        "should_transfer_files = YES\noutput = out\nerror = err\nlog = log\n"
        '+VMImage = "debian-11"\nqueue\n')})
    job.submit("job.sub")
    analysis = pool.run(["condor_q", "-better-analyze", str(job.cluster)], user=None).stdout
    done = job.wait({COMPLETED})
    assert done[0]["ExitCode"] == "0"
    assert "@vm2@" in done[0]["LastRemoteHost"], analysis
    # Not by luck: the transform gave the job a rank that scores vm2 above vm1.
    rank = pool.run(["condor_history", str(job.cluster), "-af:r", "Rank"], user=None, check=True).stdout.strip()
    assert "StringListMember" in rank and "VMLoaderImages" in rank, rank
    scores = pool.run(["condor_status", "-af:t", "VMLoaderCacheDir",
                       'ifThenElse(StringListMember("debian-11", VMLoaderImages ?: ""), 10, 0)'],
                      user=None, check=True).stdout
    assert dict(line.split("\t") for line in scores.splitlines()) == {
        "/var/cache/vmloader-1": "0", "/var/cache/vmloader-2": "10"}, scores
    assert job.file("out").read_text().startswith("11.")


def test_a_worker_whose_cache_service_keeps_the_image_warm_is_preferred_and_the_job_restores_it(pool):
    """vm2's cache service keeps debian-12 warm (root's state, built by the service itself once the
    image is fetched); vm1 caches the image alone. The probe advertises the state, the transform ranks
    vm2 higher, and the job (run as its user, with its own session daemon) starts warm from root's
    state without writing into it."""
    warm_dir = pool.path("/var/cache/vmloader-2/warm")
    pool.vmloader("images", "pull", "debian-12", cache="/var/cache/vmloader-1", user="root", check=True, timeout=600)
    kept_warm_on_vm2(pool)
    log = pool.path("/var/log/condor/VmloaderCacheLog.2")
    # (the lane is complete, so advertised, a moment before its build's process has ended)
    pool.wait_for(lambda: "keep warm: debian-12: 1 lane(s) ready" in log.read_text(), 300,
                  "vm2's cache service to log the build's end")
    assert "keeping warm: debian-12 (1 lane(s) each" in log.read_text()
    assert "keeping warm" not in pool.path("/var/log/condor/VmloaderCacheLog.1").read_text()
    assert "debian-12" not in pool.run(["sh", "-c", WARM_ADVERTISED.format(1)], user=None, check=True).stdout
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(warm_dir.glob("*/lane-*/*"))}
    jobs = pool.path(f"/home/{USER}/.local/share/vmloader/jobs")
    known = set(jobs.iterdir()) if jobs.is_dir() else set()
    job = Submission(pool, "warm", {"job.sub": (
        "executable = /bin/hostname\ntransfer_executable = false\nshould_transfer_files = YES\n"
        'output = out\nerror = err\nlog = log\n+VMImage = "debian-12"\nqueue\n')})
    job.submit("job.sub")
    done = job.wait({COMPLETED})
    assert done[0]["ExitCode"] == "0", job.file("err").read_text()
    assert "@vm2@" in done[0]["LastRemoteHost"]
    rank = pool.run(["condor_history", str(job.cluster), "-af:r", "Rank"], user=None, check=True).stdout
    assert "VMLoaderWarmImages" in rank, rank
    scores = pool.run(["condor_status", "-af:t", "VMLoaderCacheDir",
                       'ifThenElse(StringListMember("debian-12", VMLoaderImages ?: ""), 10, 0) + '
                       'ifThenElse(StringListMember("debian-12", VMLoaderWarmImages ?: ""), 10, 0)'],
                      user=None, check=True).stdout
    assert dict(line.split("\t") for line in scores.splitlines()) == {
        "/var/cache/vmloader-1": "10", "/var/cache/vmloader-2": "20"}, scores
    [record] = [json.loads((d / "metadata.json").read_text()) for d in set(jobs.iterdir()) - known]
    assert record["start"] == "warm" and "warm build" not in record["timings"], record
    assert job.file("out").read_text().strip().startswith("vm-")
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(warm_dir.glob("*/lane-*/*"))} == before


def test_a_vm_job_runs_in_the_guest_with_its_sandbox_output_files_and_exit_code(pool):
    job = Submission(pool, "vmjob", {"vm-job.sub": EXAMPLES / "vm-job.sub", "build.sh": EXAMPLES / "build.sh",
                                     "input.txt": "from the submit dir\n"})
    job.submit("vm-job.sub")
    done = job.wait({COMPLETED})[0]
    assert done["ExitCode"] == "3"
    out = fields(job.file("out").read_text())
    assert out["kernel"] != os.uname().release and "cloud" in out["kernel"]
    assert out["hostname"].startswith("vm-") and out["hostname"] != os.uname().nodename
    assert out["uid"] != "0"
    assert out["input"] == "from the submit dir"
    assert out["grid-security"].split() == ["hostcert.pem", "hostkey.pem"]
    assert out["hostkey mode"] == "600"
    assert job.file("result.txt").read_text() == "made in the VM\n"
    assert "a line for stderr" in job.file("err").read_text()
    # exit 3 is a failure: the default policy kept the state, and the job ad says where
    worker, _, snapshot = done["VMLoaderSnapshot"].partition(":")
    assert worker and pool.path(snapshot).is_dir(), done
    # and the job's user diffs it on the worker, in user space, no admin needed
    cache = "/var/cache/vmloader-2" if "vm2" in worker else "/var/cache/vmloader-1"
    diff = pool.vmloader("--debug", "snapshot", "diff", Path(snapshot).name, "--json", cache=cache, timeout=600)
    assert diff.returncode == 0, diff.stderr
    added = {c["path"]: c for c in json.loads(diff.stdout)["added"]}
    assert added["/work/result.txt"] == {"path": "/work/result.txt", "type": "file", "size": 15}, added
    uid = pool.run(["id", "-u"]).stdout.strip()
    assert uid != "0" and f"parsers ran as uid {uid}\n" in diff.stderr, diff.stderr


def test_a_guest_writing_the_starters_own_files_changes_nothing_in_the_sandbox(pool):
    forge = "; ".join(f"echo forged > {name}" for name in (".chirp.config", "_condor_stdout", ".job.ad"))
    job = Submission(pool, "chirpforge", {"forge.sub": (
        f"executable = /bin/sh\narguments = \"-c '{forge}; echo made > result.txt; echo real output; exit 3'\"\n"
        "transfer_executable = false\nshould_transfer_files = YES\nwhen_to_transfer_output = ON_EXIT\n"
        'output = out\nerror = err\nlog = log\n+VMImage = "debian-12"\n+VMLoaderSnapshot = "always"\nqueue\n')})
    job.submit("forge.sub")
    done = job.wait({COMPLETED})[0]
    assert done["ExitCode"] == "3"
    # The wrapper's chirp after collection still reached the shadow: .chirp.config was not replaced.
    assert done["VMLoaderSnapshot"].partition(":")[2], done
    assert job.file("out").read_text() == "real output\n"
    assert job.file("result.txt").read_text() == "made\n"
    err = job.file("err").read_text()
    assert all(f"refused output {name}" in err for name in (".chirp.config", "_condor_stdout", ".job.ad")), err
    assert not any(job.file(name).exists() for name in (".chirp.config", "_condor_stdout", ".job.ad"))
    record_row("a guest writes .chirp.config, .job.ad and _condor_stdout into an HTCondor job's sandbox",
               3, "completed (the command's status); the names refused", "collect",
               "refused output .chirp.config: HTCondor reserves this name in a job's sandbox",
               "the starter's own files; VMLoaderSnapshot still set by chirp; result.txt transferred")


def test_a_root_job_installs_a_deb_from_its_sandbox(pool, tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text("Package: nightly-tool\nVersion: 1.0\nArchitecture: all\n"
                                        "Maintainer: vmloader tests <t@example.org>\nDescription: test package\n")
    (pkg / "DEBIAN/postinst").write_text("#!/bin/sh\nset -e\nuseradd --system nightlysvc\n"
                                         "echo 'mode = nightly' > /etc/nightly-tool.conf\n")
    (pkg / "DEBIAN/postinst").chmod(0o755)
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(tmp_path / "nightly-tool.deb")],
                   check=True, stdout=subprocess.DEVNULL)
    job = Submission(pool, "rootjob", {"root-install.sub": EXAMPLES / "root-install.sub",
                                       "install-test.sh": EXAMPLES / "install-test.sh",
                                       "nightly-tool.deb": tmp_path / "nightly-tool.deb"})
    job.submit("root-install.sub")
    done = job.wait({COMPLETED})[0]
    out = job.file("out").read_text()
    assert done["ExitCode"] == "0", out + job.file("err").read_text()
    assert fields(out)["uid"] == "0" and fields(out)["user"] == "nightlysvc"
    assert fields(out)["config"] == "mode = nightly"


def test_a_job_without_a_vm_image_runs_on_the_worker_unchanged(pool):
    job = Submission(pool, "plain", {"plain.sub": EXAMPLES / "plain.sub"})
    job.submit("plain.sub")
    done = job.wait({COMPLETED})[0]
    assert done["ExitCode"] == "0"
    out = fields(job.file("out").read_text())
    assert out["kernel"] == os.uname().release           # the worker's own kernel: no VM


def test_an_unknown_image_holds_the_job_and_it_runs_after_qedit_and_release(pool):
    job = Submission(pool, "unknown", {"job.sub": (
        "executable = /bin/cat\narguments = /etc/debian_version\ntransfer_executable = false\n"
        "should_transfer_files = YES\noutput = out\nerror = err\nlog = log\n"
        '+VMImage = "debian-99"\nqueue\n')})
    job.submit("job.sub")
    held = job.wait({HELD})[0]
    reason = held["HoldReason"]
    assert "unknown image 'debian-99'" in reason and "vmloader on " in reason and "vm" in reason, reason
    pool.run(["condor_qedit", str(job.cluster), "VMImage", '"debian-12"'], check=True)
    pool.run(["condor_release", str(job.cluster)], check=True)
    done = job.wait({COMPLETED})[0]
    assert done["ExitCode"] == "0"
    assert job.file("out").read_text().startswith("12.")


def test_a_malformed_vm_attribute_holds_the_job_with_the_fix(pool):
    job, reason = held_true_job(pool, "malformed", '+VMLoaderRoot = "yes"\n')
    assert "+VMLoaderRoot must be True or False" in reason, reason
    pool.run(["condor_rm", str(job.cluster)], check=True)


def test_a_platform_matrix_in_one_submit_file_reports_each_os_release(pool):
    job = Submission(pool, "matrix", {"matrix.sub": EXAMPLES / "matrix.sub"})
    job.submit("matrix.sub")
    done = job.wait({COMPLETED}, count=3)
    assert [done[p]["ExitCode"] for p in sorted(done)] == ["0", "0", "0"]
    for image in IMAGES:
        release = dict(line.split("=", 1) for line in job.file(f"out.{image}").read_text().splitlines()
                       if "=" in line)
        assert release["VERSION_ID"].strip('"') == image.split("-")[1]


@pytest.mark.parametrize("tool, status", [("condor_rm", REMOVED), ("condor_hold", HELD),
                                          ("condor_vacate_job", IDLE)])
def test_stopping_a_running_vm_job_keeps_the_snapshot_and_leaves_nothing_behind(pool, tool, status):
    job = Submission(pool, tool, {"job.sub": (
        "executable = /bin/sh\narguments = \"-c 'echo started; sleep 600'\"\ntransfer_executable = false\n"
        "should_transfer_files = YES\noutput = out\nerror = err\nlog = log\n"
        '+VMImage = "debian-12"\n+VMLoaderSnapshot = "always"\nqueue\n')})
    job.submit("job.sub")
    try:
        jobs_dir = pool.path(f"/home/{USER}/.local/share/vmloader/jobs")
        phase = lambda: [d for d in jobs_dir.glob(f"condor-{job.cluster}.0-*")
                         if (d / "phase").exists() and (d / "phase").read_text().strip() == "exec"]
        job_dir = pool.wait_for(phase, 300, "the VM job to reach its exec phase")[0]
        pool.run([tool, str(job.cluster)], check=True)
        pool.wait_for(lambda: (job_dir / "metadata.json").exists(), 60, "the wrapper to finish its teardown")
        if status != IDLE:                   # a vacated job goes back to the queue and runs again elsewhere
            job.wait({status})
        assert json.loads((job_dir / "metadata.json").read_text())["outcome"] == "killed-by-signal"
        assert not (job_dir / "overlay.qcow2").exists()
        snapshots = pool.path(f"/home/{USER}/.local/share/vmloader/snapshots") / job_dir.name
        assert (snapshots / "disk.qcow2").exists() or any(snapshots.glob("*.qcow2")), list(snapshots.iterdir())
        # (the vacated job's next run starts and ends processes while we look)
        assert [pid for pid, cmdline in pool.command_lines().items() if job_dir.name in cmdline] == []
    finally:
        # Whatever happened, the job leaves the queue: a vacated one would otherwise hold a slot
        # for its 600 s run again, and the module's next tests would wait for it.
        pool.run(["condor_rm", str(job.cluster)])
        pool.wait_for(lambda: str(job.cluster) not in pool.run(["condor_q", "-allusers", "-af", "ClusterId"],
                                                                user=None).stdout.split(), 120, "the job to leave the queue")
    # the job's private libvirt session daemon and its sockets went with it
    wait_for_no_leftovers(pool)


def test_a_job_submitted_through_the_htcondor2_python_api_runs_in_a_vm(pool):
    script = (
        "import htcondor2 as htcondor\n"
        "sub = htcondor.Submit({'executable': '/bin/uname', 'arguments': '-r', 'transfer_executable': 'false',"
        " 'should_transfer_files': 'YES', 'output': 'out', 'error': 'err', 'log': 'log',"
        " 'MY.VMImage': '\"debian-13\"'})\n"
        "print(htcondor.Schedd().submit(sub).cluster())\n")
    job = Submission(pool, "api", {"submit.py": script})
    done = pool.run(["python3", "submit.py"], cwd=job.dir, check=True)
    job.cluster = int(done.stdout.strip())
    finished = job.wait({COMPLETED})[0]
    assert finished["ExitCode"] == "0"
    kernel = job.file("out").read_text().strip()
    assert kernel != os.uname().release and kernel.startswith("6.")


def test_the_nightly_dag_builds_tests_and_summarises_every_platform(pool):
    files = {p.name: p for p in EXAMPLES.glob("nightly*")}
    files["hello.sh"] = EXAMPLES / "hello.sh"
    job = Submission(pool, "nightly", files)
    done = pool.run(["condor_submit_dag", "-batch-name", "nightly", "nightly.dag"], cwd=job.dir, check=True)
    job.cluster = int(re.search(r"submitted to cluster (\d+)", done.stdout).group(1))
    finished = job.wait({COMPLETED}, timeout=1200, log=None)[0]
    summary = job.file("summary.txt")
    assert finished["ExitCode"] == "0", job.file("nightly.dag.dagman.out").read_text()[-3000:]
    text = summary.read_text()
    for image, codename in zip(IMAGES, ("bullseye", "bookworm", "trixie")):
        assert f"{image}: hello from {codename}" in text
    assert "PASSED 3 platforms" in text
    terminated = 0
    with htcondor2.JobEventLog(str(job.file("nightly.log"))) as events:
        for event in events.events(stop_after=0):
            terminated += event.type == htcondor2.JobEventType.JOB_TERMINATED and event["ReturnValue"] == 0
    assert terminated == 7          # 3 builds, 3 tests, 1 summary, each exit 0 in the nodes' event log


def test_guest_text_with_esc_cr_nul_and_10_kib_in_a_hold_reason_stays_a_clean_capped_hold(pool):
    """A root job writes a crash line (ESC, CR, NUL, bidi, 10 KiB) to its console and kills the agent:
    the infrastructure error quotes that line, and the job is held with a clean reason of at most 512
    bytes (condor_chirp's command buffer is 1024 bytes; a NUL used to crash the wrapper)."""
    from vmloader.bootstrapper import classad
    from vmloader.bootstrapper.condor import HOLD_REASON_MAX
    from .faulttable import record_row
    job = Submission(pool, "hostiletext", {
        "hostile_text.py": Path(__file__).with_name("hostile_text.py"),
        "job.sub": ("executable = hostile_text.py\narguments = crash\nshould_transfer_files = YES\n"
                    "when_to_transfer_output = ON_EXIT\noutput = out\nerror = err\nlog = log\n"
                    '+VMImage = "debian-12"\n+VMLoaderRoot = True\nqueue\n')})
    job.file("hostile_text.py").chmod(0o755)
    job.submit("job.sub")
    job.wait({HELD}, timeout=900)
    shown = pool.run(["condor_q", "-allusers", str(job.cluster), "-af", "HoldReason", "HoldReasonSubCode"],
                     user=None, timeout=60).stdout
    reason, _, subcode = shown.rstrip("\n").rpartition(" ")
    assert subcode == "125", shown
    assert reason.isprintable(), repr(reason)                # no ESC, CR (a line break here), NUL, bidi
    assert len(classad.quote_old(reason).encode()) <= HOLD_REASON_MAX, len(reason)
    assert reason.startswith("vmloader on ") and "[exec]: the guest agent restarted" in reason, reason
    assert "BUG: guest-text-crash \\x1b[2J\\x1b[31mred\\rover\\x00nul \\u202eevil" in reason, reason
    assert "AAAA... (hint: this is not the command's own exit status" in reason, reason
    pool.run(["condor_rm", str(job.cluster)], check=True)
    record_row(fault="guest text with ESC, CR, NUL and 10 KiB in a hold reason",
               exit=125, outcome="held (HoldReason, subcode 125)", phase="exec", message=reason,
               kept="the job (on hold); the guest text escaped, the reason capped at 512 bytes")


# Drives a program on a pty (as a user at a terminal): waits for a prompt, types, prints what it saw.
PTY_DRIVER = r"""
import os, pty, select, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
seen = b""
def until(marker, timeout):
    global seen
    end = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < end:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return False
            if not data:
                return False
            seen += data
    return marker in seen
started = time.monotonic()
prompt = until(b"$ ", 300)
print("prompt after %.2f s" % (time.monotonic() - started) if prompt else "no prompt", flush=True)
os.write(fd, b"id -un; tty; echo DONE$((6*7))\r")
until(b"DONE42", 60)
os.write(fd, b"exit\r")
until(b"\0", 30)
os.waitpid(pid, 0)
print(seen.decode("utf-8", "replace"))
"""


def test_condor_ssh_to_job_lands_in_the_running_guest_as_the_job_with_a_shell_commands_and_sftp(pool):
    job = Submission(pool, "sshjob", {"job.sub": (
        "executable = /bin/sh\narguments = \"-c 'until [ -e stop ]; do sleep 1; done'\"\n"
        "transfer_executable = false\n"
        'environment = "FOO=from-the-submit-file"\noutput = out\nerror = err\nlog = log\n'
        '+VMImage = "debian-12"\nqueue\n'),
        "plain.sub": "executable = /bin/sleep\narguments = 600\noutput = pout\nerror = perr\nlog = plog\nqueue\n",
        "upload.txt": "from the submit side\n",
        "sftp.batch": "put upload.txt\nget made-in-guest.txt fetched.txt\n"})
    job.submit("job.sub")
    vm_job = f"{job.cluster}.0"
    try:
        check_ssh_to_job(pool, job, vm_job)
        check_ssh_to_job_while_the_vm_is_torn_down(pool, job, vm_job)
    finally:
        pool.run(["condor_rm", "-all"])


def check_ssh_to_job(pool, job, vm_job: str) -> None:
    job.wait({RUNNING})
    # Until the guest's command runs, the ForceCommand says why there is no shell yet (the VM boots first).
    attempts = []

    def answered():
        done = ssh_to_job(pool, job, "-auto-retry", vm_job, "--", "cat /etc/hostname; id -un; pwd; echo $FOO; exit 3")
        attempts.append(done)
        return done if "still starting" not in done.stderr else None
    done = pool.wait_for(answered, 600, "condor_ssh_to_job to reach the job's guest", 3)
    for early in attempts[:-1]:
        assert "this job's VM is still starting" in early.stderr and "try again" in early.stderr, early.stderr
    assert done.returncode == 3 and len(done.stdout.split()) == 4, done.stdout + done.stderr
    hostname, user, cwd, foo = done.stdout.split()
    assert hostname.startswith("vm-") and user == "vmloader" and cwd == "/work" and foo == "from-the-submit-file"
    # An interactive session: a pty and a prompt in the guest (the output's \r\n read as \n).
    shell = pool.run(["python3", "-c", PTY_DRIVER, "condor_ssh_to_job", vm_job], cwd=job.dir, timeout=400)
    assert shell.stdout.startswith("prompt after"), shell.stdout + shell.stderr
    assert "vmloader@vm-" in shell.stdout and "\nvmloader\n/dev/pts/" in shell.stdout, shell.stdout
    # sftp (and scp, which speaks sftp) through the same path, with the shipped SSH_TO_JOB_SFTP_CMD.
    ssh_to_job(pool, job, vm_job, "--", "echo made in the guest > made-in-guest.txt")
    sftp = ssh_to_job(pool, job, "-ssh", "sftp -b sftp.batch", vm_job)
    assert sftp.returncode == 0, sftp.stdout + sftp.stderr
    assert job.file("fetched.txt").read_text() == "made in the guest\n"
    assert ssh_to_job(pool, job, vm_job, "--", "cat upload.txt").stdout == "from the submit side\n"
    # A job without +VMImage keeps HTCondor's own session: the host sandbox.
    plain = job.submit("plain.sub")
    job.wait({RUNNING}, log="plog")
    host = ssh_to_job(pool, job, "-auto-retry", f"{plain}.0", "--", "echo $_CONDOR_SCRATCH_DIR")
    assert re.search(r"^/var/lib/condor/execute2?/dir_\d+$", host.stdout.strip()), host.stdout + host.stderr


def check_ssh_to_job_while_the_vm_is_torn_down(pool, job, vm_job: str) -> None:
    """Once the command has ended, condor_ssh_to_job says the VM is being torn down. Held there, not
    raced: the job's private libvirt session daemon is stopped (SIGSTOP) while the command still
    runs, so the wrapper, past collecting the outputs, waits in its teardown phase on the VM's
    destroy until the test lets the daemon go on (SIGCONT)."""
    runtimes = list(pool.path("/tmp").glob("vml-*"))       # the VM job's private libvirt (the plain job has none)
    assert len(runtimes) == 1, runtimes
    daemons = {pidfile.stem: int(pidfile.read_text()) for pidfile in (runtimes[0] / "libvirt").glob("*.pid")
               if not pidfile.stem.startswith("virtlogd")}     # QEMU's console goes on through virtlogd
    assert daemons, list((runtimes[0] / "libvirt").iterdir())
    jobs_dir = pool.path(f"/home/{USER}/.local/share/vmloader/jobs")
    job_dir = pool.wait_for(lambda: list(jobs_dir.glob(f"condor-{vm_job}-*")), 60, f"{vm_job}'s record")[0]
    phase = lambda: (job_dir / "phase").read_text().strip()
    assert phase() == "exec"
    for pid in daemons.values():
        os.kill(pid, signal.SIGSTOP)
    try:
        assert ssh_to_job(pool, job, vm_job, "--", "touch stop").returncode == 0     # the command ends
        pool.wait_for(lambda: phase() == "teardown", 600, f"{vm_job}'s wrapper to reach its teardown")
        late = ssh_to_job(pool, job, vm_job, "--", "true")
    finally:
        for pid in daemons.values():
            os.kill(pid, signal.SIGCONT)
    assert late.returncode == 125, late.stdout + late.stderr
    assert ("vmloader: [ssh-to-job] this job's command has ended and its VM is being torn down (teardown)"
            in late.stderr), late.stderr
    assert "vmloader snapshot shell ID" in late.stderr, late.stderr
    job.cluster = int(vm_job.split(".")[0])             # (the plain job's cluster was submitted since)
    done = job.wait({COMPLETED}, timeout=600)
    assert done[0]["ExitCode"] == "0", done


def test_a_job_writing_past_its_request_disk_is_held_naming_the_limit_and_a_too_small_one_up_front(pool):
    """request_disk bounds what the VM writes (its overlay): past it the VM is paused and the job
    held (subcode 125) with the limit in the reason, not reported as a crashed guest. A request_disk
    that leaves no room for a VM at all is held before any VM starts."""
    from vmloader.bootstrapper.condor import MIN_OVERLAY_MIB
    small, small_reason = held_true_job(pool, "disktoosmall", "request_disk = 1MB\n")
    assert "request_disk 1024 KiB is too small for a VM of debian-12" in small_reason, small_reason
    assert f"at least {MIN_OVERLAY_MIB} MiB" in small_reason and "[job ad]" in small_reason, small_reason
    pool.run(["condor_rm", str(small.cluster)], check=True)
    record_row("job ad with a request_disk too small for any VM (`request_disk = 1MB`)", 125,
               "held (HoldReason, subcode 125)", "job ad", small_reason, "the job (on hold); no VM started")
    fill = Submission(pool, "diskfill", {"job.sub": (
        "executable = /bin/sh\narguments = \"-c 'dd if=/dev/zero of=big bs=1M count=2000 oflag=direct; "
        "echo dd exited $?; sleep 600'\"\ntransfer_executable = false\nshould_transfer_files = YES\n"
        "output = out\nerror = err\nlog = log\nrequest_disk = 200MB\n"
        '+VMImage = "debian-12"\n+VMLoaderSnapshot = "never"\nqueue\n')})
    fill.submit("job.sub")
    fill.wait({HELD}, timeout=900)
    shown = pool.run(["condor_q", "-allusers", str(fill.cluster), "-af", "HoldReason", "HoldReasonSubCode"],
                     user=None, timeout=60).stdout
    reason, _, subcode = shown.rstrip("\n").rpartition(" ")
    assert subcode == "125", shown
    assert "[exec]: the job reached its disk limit" in reason, reason
    assert "request_disk 204800 KiB less the sandbox's" in reason, reason
    assert "dd exited" not in fill.file("out").read_text()        # paused mid-write, never resumed
    pool.run(["condor_rm", str(fill.cluster)], check=True)
    record_row("an HTCondor VM job writes past its request_disk (`request_disk = 200MB`, 2000 MiB written)",
               125, "held (HoldReason, subcode 125)", "exec", reason,
               "the job (on hold); the VM paused at the limit, then destroyed; the state per policy")

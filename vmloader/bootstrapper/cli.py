"""The `vmloader` command: a thin layer over the library that maps errors to exit codes."""
import argparse
import json
import logging
import os
import pwd
import shutil
import sqlite3
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from . import bootmode, build, catalog, config as config_mod, forward, hypervisors, orphans, proc, publish
from . import job as job_mod, runners, sessions, status, stopsignals, virt, warm
from . import snapshots as snapshots_mod
from .cache import ImageCache
from .console import escape_log
from .errors import EXIT_INFRA, ImageError, Interrupted, Reported, SnapshotError, UsageError, VMLoaderError
from .job import JobSpec
from .snapshots import POLICIES, SnapshotStore

RAW_CONSOLE_HELP = ("with --console: the guest's console bytes exactly as written, its escape sequences "
                    "reaching your terminal (default: control characters and bidi overrides escaped)")


def _env_pair(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
    return key, value


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a command in a fresh VM")
    p.add_argument("--image", required=True,
                   help="image name, e.g. debian-12 (or NAME@VERSION), or an http(s) URL of a bootable qcow2")
    p.add_argument("--sha256", help="expected sha256 of an --image URL (default: fetched from URL.sha256)")
    p.add_argument("--cpus", type=int)
    p.add_argument("--memory", type=int, metavar="MiB")
    p.add_argument("--root", action="store_true", help="run the command as root in the guest")
    p.add_argument("--timeout", type=float, metavar="S", help="stop the job after S seconds (exit 124)")
    p.add_argument("--env", type=_env_pair, action="append", default=[], metavar="K=V")
    p.add_argument("--input", action="append", default=[], metavar="PATH",
                   help="copy a file into the guest work dir before the command")
    p.add_argument("--output", action="append", default=[], metavar="PATH",
                   help="copy a path (relative to the guest work dir) back after the command")
    p.add_argument("--output-new", action="store_true",
                   help="also copy back every top-level file the command created or changed (as HTCondor does)")
    p.add_argument("--output-dir", default=".", help="where --output files land (default: .)")
    p.add_argument("--snapshot", choices=POLICIES, help="keep the VM's disk state (default on-failure)")
    p.add_argument("--network", choices=("user", "none"), default="user")
    p.add_argument("--hypervisor", choices=("kvm", "qemu", "xen"), help="force a hypervisor")
    p.add_argument("--console", action="store_true", help="follow the guest console live on stderr")
    p.add_argument("--raw", action="store_true", help=RAW_CONSOLE_HELP)
    p.add_argument("--job-id", help="use this job id (default: generated)")
    p.add_argument("--cold", action="store_true",
                   help="boot the image even when a warm state of it could be restored (see warm_start)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON result; the command's output goes to files in the job dir")
    p.add_argument("command", nargs=argparse.REMAINDER)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmloader", description="Run batch jobs in throwaway VMs.")
    parser.add_argument("--debug", action="store_true", help="log every host command; tracebacks")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_run(sub)
    st = sub.add_parser("status", help="job VMs running on this worker")
    st.add_argument("--json", action="store_true")
    clean = sub.add_parser("cleanup", help="end jobs whose vmloader died: destroy the VM, keep a snapshot")
    clean.add_argument("--json", action="store_true")
    hv = sub.add_parser("hypervisors", help="which hypervisors are usable here, and why")
    hv.add_argument("--json", action="store_true")
    images = sub.add_parser("images", help="build and list guest images").add_subparsers(dest="images_cmd", required=True)
    b = images.add_parser("build", help="build an image from its recipe (root)")
    b.add_argument("name")
    b.add_argument("--init", choices=("fast", "systemd"), default="fast",
                   help="systemd: boot systemd with the agent as a unit (for jobs needing services)")
    b.add_argument("--force", action="store_true")
    lst = images.add_parser("list", help="known images, whether they are cached, and their warm states")
    lst.add_argument("--json", action="store_true")
    wrm = images.add_parser("warm", help="build warm states of an image ahead of time (one per lane)")
    wrm.add_argument("name")
    wrm.add_argument("--cpus", type=int)
    wrm.add_argument("--memory", type=int, metavar="MIB")
    wrm.add_argument("--network", choices=("user", "none"), default="user")
    wrm.add_argument("--lanes", type=int, default=1, help="how many jobs of this shape may start warm at once")
    wrm.add_argument("--json", action="store_true")
    pull = images.add_parser("pull", help="fetch an image from the repositories into the cache")
    pull.add_argument("name")
    pull.add_argument("--json", action="store_true")
    add = images.add_parser("add", help="register your own qcow2 (and kernel/initrd) as an image")
    add.add_argument("name")
    add.add_argument("--disk", required=True, help="a qcow2 disk image")
    add.add_argument("--kernel", help="kernel for direct boot (without it: the disk's own boot loader)")
    add.add_argument("--initrd")
    add.add_argument("--boot", choices=bootmode.BOOT_MODES,
                     help="the disk's own boot: bios (SeaBIOS) or uefi (OVMF); default: read from the disk "
                          "(GPT with an EFI system partition: uefi; boot code in the MBR: bios)")
    add.add_argument("--cmdline", default="root=/dev/vda rw console=ttyS0",
                     help="kernel command line for direct boot")
    add.add_argument("--json", action="store_true")
    ins = images.add_parser("inspect", help="what an image's disk holds (partitions, boot mode, OS, kernels, "
                            "python3, cloud-init, guest agents), read offline without booting it")
    ins.add_argument("name", help="a catalogue image (NAME or NAME@VERSION), or a path with a / "
                     "(./disk.qcow2) to a qcow2 or raw disk")
    ins.add_argument("--json", action="store_true")
    kit = images.add_parser("agent-kit", help="write what an image build needs to carry vmloader's agent "
                            "(no delivery at boot): the agent, a systemd unit, install.sh")
    kit.add_argument("dir", help="where to write the kit; then, in the image build: sh DIR/install.sh [ROOT]")
    kit.add_argument("--json", action="store_true")
    rm = images.add_parser("rm", help="remove an image's files from the cache (not while a job uses it)")
    rm.add_argument("name")
    rm.add_argument("--json", action="store_true")
    prune = images.add_parser("prune", help="evict least recently used images down to the cache bound")
    prune.add_argument("--max-bytes", help="bound to prune to (default: cache_max_bytes from config)")
    prune.add_argument("--json", action="store_true")
    ver = images.add_parser("verify", help="re-hash every cached artifact; drop the ones that differ")
    ver.add_argument("--json", action="store_true")
    val = images.add_parser("validate", help="check a manifest.json")
    val.add_argument("file")
    pub = images.add_parser("publish", help="copy locally built (or added) images into a repository directory")
    pub.add_argument("dir")
    pub.add_argument("names", nargs="*", help="images to publish: built here, or added here with `images add` "
                                              "(a stock image keeps its boot mode); default: all built here")
    repo = sub.add_parser("repo", help="serve a repository").add_subparsers(dest="repo_cmd", required=True)
    serve = repo.add_parser("serve", help="serve a repository directory over HTTP (Range, ETag)")
    serve.add_argument("dir")
    serve.add_argument("--bind", default="127.0.0.1:8080", metavar="HOST:PORT")
    cache_cmd = sub.add_parser("cache", help="the shared image cache's service").add_subparsers(
        dest="cache_cmd", required=True)
    cserve = cache_cmd.add_parser("serve", help="run by the cache's owner: fetch images for other users")
    cserve.add_argument("--socket", help="Unix socket path (default: cache_socket, or <cache_dir>/service.sock)")
    cserve.add_argument("--log", help="append the service's log (who asked for what) to this file")
    cond = sub.add_parser("condor", help="HTCondor execute-side hooks").add_subparsers(dest="condor_cmd",
                                                                                      required=True)
    wrap = cond.add_parser("wrapper", help="USER_JOB_WRAPPER: run a job with +VMImage in a VM, others as is")
    wrap.add_argument("command", nargs=argparse.REMAINDER)
    cond.add_parser("probe", help="STARTD_CRON: advertise hypervisors, cached images, free cache space")
    ssh = cond.add_parser("ssh-to-job", help="the ssh_to_job sshd's ForceCommand: a VM job's session goes "
                                             "into its guest (condor/ssh_to_job_sshd_config_template)")
    ssh.add_argument("command", nargs=argparse.REMAINDER,
                     help="what HTCondor would force (_INSERT_FORCE_COMMAND_): run as is for other jobs")
    snap = sub.add_parser("snapshot", help="kept job states").add_subparsers(dest="snap_cmd", required=True)
    for name in ("list", "show", "rm", "logs"):
        sp = snap.add_parser(name)
        if name != "list":
            sp.add_argument("id")
        sp.add_argument("--json", action="store_true")
        if name == "logs":
            sp.add_argument("--raw", action="store_true",
                            help="the guest's bytes exactly as written (default: control characters, "
                                 "escape sequences and bidi overrides escaped, on a terminal or not)")
    sx = snap.add_parser("exec", help="boot a kept state on a throwaway overlay and run one command in it")
    sx.add_argument("id")
    sx.add_argument("--root", action="store_true", help="run the command as root in the guest")
    sx.add_argument("--timeout", type=float, metavar="S")
    sx.add_argument("--env", type=_env_pair, action="append", default=[], metavar="K=V",
                    help="added to the job's own environment")
    sx.add_argument("--console", action="store_true", help="follow the guest console live on stderr")
    sx.add_argument("--raw", action="store_true", help=RAW_CONSOLE_HELP)
    sx.add_argument("--network", choices=("user", "none"), default="user")
    sx.add_argument("command", nargs=argparse.REMAINDER)
    sh = snap.add_parser("shell", help="an interactive shell (a real terminal) in a kept state, in the job's "
                                       "work dir with its environment; attaches to it when booted")
    sh.add_argument("id")
    sh.add_argument("--root", action="store_true", help="a root shell")
    sh.add_argument("--console", action="store_true", help="follow the guest console live on stderr")
    sh.add_argument("--raw", action="store_true", help=RAW_CONSOLE_HELP)
    sh.add_argument("--network", choices=("user", "none"), default="user")
    sb = snap.add_parser("boot", help="boot a kept state (resuming its memory when kept) on a throwaway "
                                      "overlay and keep it running until Ctrl-C")
    sb.add_argument("id")
    sb.add_argument("--root", action="store_true", help="shells and --ssh log in as root")
    sb.add_argument("--forward", action="append", default=[], metavar="GUEST",
                    help="make the guest's port GUEST a Unix socket only you can open (ports/guest-GUEST.sock "
                         "in the snapshot's directory; `curl --unix-socket`, or `snapshot connect`). No TCP "
                         "port: on loopback any local user could connect. The old HOST:GUEST form maps to "
                         "the same socket")
    sb.add_argument("--ssh", action="store_true",
                    help="authorize your public key, start the guest's sshd and print an ssh command that "
                         "goes through a forwarded socket and checks the guest's pinned host key")
    sb.add_argument("--ssh-key", metavar="FILE.pub", help="the public key for --ssh (default ~/.ssh/id_*.pub)")
    sb.add_argument("--console", action="store_true", help="follow the guest console live on stderr")
    sb.add_argument("--raw", action="store_true", help=RAW_CONSOLE_HELP)
    sb.add_argument("--network", choices=("user", "none"), default="user")
    sb.add_argument("--json", action="store_true", help="print how to reach it as one JSON line on stdout")
    sc = snap.add_parser("connect", help="connect stdin/stdout to a forwarded port of a booted snapshot "
                                         "(for ssh's ProxyCommand)")
    sc.add_argument("id", nargs="?")
    sc.add_argument("port", nargs="?", type=int, help="the guest port given to `snapshot boot --forward`")
    sc.add_argument("--socket", metavar="PATH", help="a forward's socket instead of ID PORT")
    sp = snap.add_parser("prune", help="remove snapshots beyond the retention limits (oldest first)")
    sp.add_argument("--dry-run", action="store_true", help="only say what would go")
    sp.add_argument("--json", action="store_true")
    se = snap.add_parser("export", help="write a standalone qcow2 (no backing file) of a kept state")
    se.add_argument("id")
    se.add_argument("-o", "--output", required=True, metavar="FILE.qcow2")
    se.add_argument("--json", action="store_true")
    sd = snap.add_parser("diff", help="files the job added, changed or removed against its base (no boot)")
    sd.add_argument("id")
    sd.add_argument("--all", action="store_true", help="also what vmloader's boot writes (/etc/hostname, ...)")
    sd.add_argument("--json", action="store_true")
    return parser


def _show_logs(logs: dict, as_json: bool, raw: bool) -> None:
    """`snapshot logs`: the guest's text escaped unless --raw, whether stdout is a terminal or not
    (a log saved to a file is read on a terminal later); --raw writes its bytes as they are."""
    if not raw:
        logs = {**logs, **{key: escape_log(logs[key]) for key in ("console_tail", "stdout_tail", "stderr_tail")}}
    text = "\n".join(f"== {title} ==\n{body}" for title, body in (
        ("console log (tail)", logs["console_tail"]), ("stdout (tail)", logs["stdout_tail"]),
        ("stderr (tail)", logs["stderr_tail"]),
        ("phase timings (s)", "\n".join(f"{k:14} {v}" for k, v in logs["timings"].items()))))
    if as_json or not raw:
        _emit(logs, as_json, text)
        return
    sys.stdout.flush()
    sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape") + b"\n")
    sys.stdout.buffer.flush()


def _emit(data, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


def _probes(cfg: config_mod.Config) -> hypervisors.HostProbes:
    return runners.host_probes(cfg)


def _reap_orphans(cfg) -> list:
    uri = cfg.libvirt_uri or virt.default_uri("qemu", os.geteuid())
    reaped = orphans.reap_all(cfg.jobs_dir, lambda: virt.connect(uri), SnapshotStore(cfg.snapshots_dir))
    for orphan in reaped:
        kept = f"; snapshot {orphan.snapshot} kept" if orphan.snapshot else ""
        print(f"vmloader: cleaned up job {orphan.job_id}: its vmloader (pid {orphan.owner_pid}) had died"
              f"{'; VM destroyed' if orphan.domain_destroyed else ''}{kept}", file=sys.stderr)
    return reaped


def _command(args) -> list:
    """The command after `--` (argparse keeps the separator in REMAINDER)."""
    return args.command[1:] if args.command[:1] == ["--"] else args.command


def _report(result) -> None:
    """A job's infrastructure error, as the user reads it on stderr."""
    if result.error:
        err = VMLoaderError(result.error["message"], result.error["hint"], result.error["phase"])
        print(err.user_text(), file=sys.stderr)


def cmd_status(args, cfg) -> int:
    jobs = status.running_jobs(cfg.jobs_dir, _user_name())
    rows = [f"{j.job_id}  {j.image:24} {j.user:10} up {j.uptime_s:7.1f}s  {j.phase:12} "
            f"cpu {j.cpu_percent if j.cpu_percent is not None else '-'}%  "
            f"rss {(j.rss_bytes or 0) // 2**20} MiB  {j.console_log}" for j in jobs]
    _emit([j.to_dict() for j in jobs], args.json, "\n".join(rows) or "no job VMs running")
    return 0


def _user_name() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def cmd_cleanup(args, cfg) -> int:
    reaped = _reap_orphans(cfg)
    if args.json:
        _emit([o.to_dict() for o in reaped], True, "")
    elif not reaped:
        print("no orphaned jobs")
    return 0


def cmd_run(args, cfg) -> int:
    try:
        _reap_orphans(cfg)
    except VMLoaderError as exc:       # the job itself will report a broken libvirt clearly
        print(f"vmloader: skipped cleaning up orphaned jobs: {exc.message}", file=sys.stderr)
    command = _command(args)
    spec = JobSpec(image=args.image, image_sha256=args.sha256, command=tuple(command), cpus=args.cpus, memory_mib=args.memory,
                   root=args.root, timeout=args.timeout, env=dict(args.env), inputs=tuple(args.input),
                   outputs=tuple(args.output), output_dir=Path(args.output_dir), collect_new=args.output_new,
                   snapshot=args.snapshot or cfg.snapshot_policy, network=args.network,
                   console=args.console, console_raw=args.raw, capture_dir=args.json, job_id=args.job_id,
                   cold=args.cold)
    runner = runners.job_runner(cfg, hypervisor=args.hypervisor, stdin=_stdin())
    result = runner.run(spec)
    if args.json:
        _emit(result.to_dict(), True, "")
    else:
        _report(result)
        where = f"; snapshot {result.snapshot} in {cfg.snapshots_dir / result.snapshot}" if result.snapshot else ""
        print(f"vmloader: job {result.job_id}: {result.outcome} (exit {result.exit_status}){where}",
              file=sys.stderr)
    return result.exit_status


def cmd_hypervisors(args, cfg) -> int:
    found = hypervisors.detect(_probes(cfg))
    text = "\n".join(f"{h.name:6} {'usable' if h.usable else 'unusable':9} {h.reason}" for h in found)
    _emit([h.to_dict() for h in found], args.json, text)
    return 0


def cmd_images(args, cfg) -> int:
    cache = ImageCache.configured(cfg)
    if args.images_cmd in ("build", "publish") and not isinstance(cache, ImageCache):
        raise UsageError(f"`images {args.images_cmd}` writes the cache {cfg.cache_dir}: only its owner may",
                         hint="run it as the cache's owner (root, or the cache's system user)")
    if args.images_cmd == "build":
        entry = catalog.load_manifest(catalog.EMBEDDED_MANIFEST).find(args.name)
        if entry is None or entry.recipe is None:
            raise UsageError(f"no recipe for image {args.name!r}",
                             hint="images with recipes: " + ", ".join(
                                 catalog.load_manifest(catalog.EMBEDDED_MANIFEST).names()))
        if args.init == "systemd":
            entry = replace(entry, name=entry.name + "-systemd",
                            recipe=replace(entry.recipe, init="systemd"))
        built = build.build_image(entry, cache, force=args.force)
        print(built.ref)
        return 0
    if args.images_cmd in IMAGE_ACTIONS:
        return IMAGE_ACTIONS[args.images_cmd](args, cfg, cache)
    rows = []
    states = warm.WarmStore(warm.warm_root(cfg), 0).summary()
    for name in cache.known_names():
        try:
            resolved = cache.resolve(name)
            rows.append({"name": name, "version": resolved.entry.version, "cached": True,
                         "disk": str(resolved.disk),
                         "warm": [{k: s[k] for k in ("cpus", "memory_mib", "network", "lanes", "bytes")}
                                  for s in states if s["image"] == resolved.entry.ref]})
        except VMLoaderError as exc:
            rows.append({"name": name, "version": None, "cached": False, "note": exc.message, "warm": []})
    lines = []
    for r in rows:
        lines.append(f"{r['name']:20} {'cached ' + r['version'] if r['cached'] else 'not cached'}")
        lines += [f"{'':20} warm: {w['cpus']} cpu, {w['memory_mib']} MiB, network {w['network']}: "
                  f"{w['lanes']} lane(s), {w['bytes'] / 2**20:.0f} MiB" for w in r["warm"]]
    _emit(rows, args.json, "\n".join(lines))
    return 0


def _images_pull(args, cfg, cache) -> int:
    image = cache.resolve(args.name)
    data = {"image": image.entry.ref, **{k: str(v) for k, v in image.paths.items()}}
    _emit(data, args.json, image.entry.ref)
    return 0


def _images_verify(args, cfg, cache) -> int:
    bad = cache.verify_all()
    text = "\n".join(f"removed corrupt artifact {sha}" for sha in bad) or "every cached artifact verified"
    _emit({"corrupt_removed": bad}, args.json, text)
    return 1 if bad else 0


def _images_validate(args, cfg, cache) -> int:
    manifest = catalog.load_manifest(Path(args.file), missing_ok=False)
    print(f"{args.file}: valid, {len(manifest.images)} image versions")
    return 0


def _images_publish(args, cfg, cache) -> int:
    published = publish.publish(cache, Path(args.dir), args.names)
    for entry in published:
        print(f"published {entry.ref} into {args.dir}")
    return 0


def _images_add(args, cfg, cache) -> int:
    if bool(args.kernel) != bool(args.initrd):
        raise UsageError("--kernel and --initrd go together", hint="give both, or neither for firmware boot")
    files = {"disk": Path(args.disk)}
    if args.kernel:
        files.update(kernel=Path(args.kernel), initrd=Path(args.initrd))
    for kind, path in files.items():
        if not path.is_file():
            raise UsageError(f"--{kind} {path}: no such file")
    if args.kernel and args.boot:
        raise UsageError("--boot is for disks with their own boot loader, --kernel for direct kernel boot",
                         hint="give one of them")
    if _disk_format(files["disk"]) == "qcow2":
        return _add_image(args, cache, files)
    scratch = cache.scratch_dir("add-raw")       # a raw disk is cached as a qcow2 of it
    try:
        converted = scratch / "disk.qcow2"
        proc.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(files["disk"]), str(converted)],
                 hint="check there is room in the cache")
        return _add_image(args, cache, dict(files, disk=converted), shown=files["disk"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _add_image(args, cache, files: dict, shown: Optional[Path] = None) -> int:
    shown = shown or files["disk"]
    boot = "direct-kernel" if args.kernel else (args.boot or bootmode.detect_disk(files["disk"]))
    problem = bootmode.bios_boot_problem(bootmode.read_head(files["disk"])) if args.boot == "bios" else None
    if problem:
        raise ImageError(f"--disk {shown} --boot bios: {problem}", hint=NO_BIOS_CODE_HINT)
    if boot is None:
        raise ImageError(f"--disk {shown}: no boot loader found (no EFI system partition in a GPT, "
                         "no boot code in the MBR)",
                         hint="give --kernel and --initrd to boot its kernel directly, or --boot bios|uefi "
                              "if the disk boots in a way vmloader does not recognise")
    entry = catalog.ImageEntry(name=args.name, version="custom", boot=boot,
                               cmdline=args.cmdline if args.kernel else "")
    added = cache.add_custom(entry, files)
    _emit(added.to_dict(), args.json, f"added {added.ref} ({added.boot} boot)")
    return 0


DISK_FORMATS = ("qcow2", "raw")
NO_BIOS_CODE_HINT = ("a BIOS-booted disk carries its boot loader's code in its first sector (grub-install puts "
                     "it there); for a GPT disk with an EFI system partition give --boot uefi, or boot its "
                     "kernel directly with --kernel and --initrd")


def _disk_format(disk: Path) -> str:
    """qcow2 or raw (what qemu-img says); any other format, or a qcow2 with a backing file, is refused."""
    info = json.loads(proc.run(["qemu-img", "info", "--output=json", str(disk)],
                               hint="is it a disk image?").stdout)
    fmt = info.get("format")
    if fmt not in DISK_FORMATS:
        raise UsageError(f"--disk {disk} is a {fmt} disk image: images add takes qcow2 or raw",
                         hint=f"convert it: qemu-img convert -O qcow2 {disk} {disk.with_suffix('.qcow2')}")
    if info.get("backing-filename"):
        raise UsageError(f"{disk} has a backing file ({info['backing-filename']})",
                         hint="flatten it first: qemu-img convert -O qcow2 IN OUT")
    return fmt


def _managing(cache, action):
    try:
        return action()
    except (OSError, sqlite3.Error) as exc:
        raise ImageError(f"cannot manage the cache at {cache.root}: {exc}",
                         hint="do it as the cache's owner (README: one cache for all users of a worker)") from None


def _images_inspect(args, cfg, cache) -> int:
    from . import imageinfo
    if "/" in args.name:                      # a path; catalogue names have no slash
        info = imageinfo.inspect(Path(args.name))
    else:
        image = cache.resolve(args.name)
        with cache.pin(image):
            info = imageinfo.inspect(image.disk, "qcow2", catalogue_boot=image.entry.boot)
        info = replace(info, disk=f"{image.entry.ref}: {info.disk}")
    _emit(info.to_dict(), args.json, "\n".join(info.lines()))
    return 0


def _images_agent_kit(args, cfg, cache) -> int:
    from . import agentkit
    written = agentkit.write_kit(Path(args.dir))
    _emit({"dir": args.dir, "files": [str(path) for path in written]}, args.json,
          f"wrote {', '.join(path.name for path in written)} into {args.dir}; in the image's build, as root: "
          f"sh {args.dir}/install.sh [ROOT]")
    return 0


def _images_rm(args, cfg, cache) -> int:
    removed = _managing(cache, lambda: cache.remove_image(args.name))
    _emit([e.sha256 for e in removed], args.json, f"removed {len(removed)} files of {args.name}")
    return 0


def _images_prune(args, cfg, cache) -> int:
    limit = config_mod.load(overrides={"cache_max_bytes": args.max_bytes}).cache_max_bytes
    removed = _managing(cache, lambda: cache.evict(limit))
    text = "\n".join(f"evicted {e.image or e.sha256[:12]} ({e.size} bytes)" for e in removed) or "nothing to evict"
    _emit([{"sha256": e.sha256, "image": e.image, "size": e.size} for e in removed], args.json, text)
    return 0


def _images_warm(args, cfg, cache) -> int:
    if args.lanes < 1:
        raise UsageError("--lanes must be at least 1")
    if not cfg.warm_start:
        raise UsageError("warm_start is off in the configuration: jobs would not use the states",
                         hint="set warm_start = true (or VMLOADER_WARM_START=true)")
    results = runners.warm_up(cfg, args.name, cpus=args.cpus, memory_mib=args.memory, network=args.network,
                              lanes=args.lanes, progress=lambda line: print(f"vmloader: {line}", file=sys.stderr))
    warmed = sum(r.start == "warm" for r in results)
    _emit({"image": args.name, "lanes": warmed, "requested": args.lanes,
           "jobs": [r.to_dict() for r in results]}, args.json, f"{args.name}: {warmed} of {args.lanes} lane(s) warm")
    return 0 if warmed == args.lanes else EXIT_INFRA


IMAGE_ACTIONS = {"warm": _images_warm, "pull": _images_pull, "verify": _images_verify, "validate": _images_validate,
                 "publish": _images_publish, "add": _images_add, "inspect": _images_inspect, "rm": _images_rm,
                 "prune": _images_prune, "agent-kit": _images_agent_kit}


def cmd_cache(args, cfg) -> int:
    from .cache import owns
    if not owns(cfg.cache_dir):
        raise UsageError(f"only the owner of {cfg.cache_dir} serves it",
                         hint="run `vmloader cache serve` as that user (root, or the cache's system user)")
    from . import cacheservice
    if args.log:
        sys.stderr = open(args.log, "a", buffering=1)
    cacheservice.serve(cfg, Path(args.socket) if args.socket else None)
    return 0


def cmd_repo(args, cfg) -> int:
    host, _, port = args.bind.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--bind {args.bind!r}: expected HOST:PORT", hint="e.g. --bind 127.0.0.1:8080")
    from . import reposerver              # (http.server: imported by this command alone)
    reposerver.serve(Path(args.dir), host, int(port))
    return 0


def cmd_condor(args, cfg) -> int:
    from . import condor
    if args.condor_cmd == "wrapper":
        return condor.run_wrapper(_command(args))
    if args.condor_cmd == "ssh-to-job":
        from . import sshtojob
        return sshtojob.run(_command(args))
    print("\n".join(condor.probe_lines(cfg)))
    return 0


def _base_present(cfg, snap) -> bool:
    """The snapshot's base image, re-fetched (by its exact version, so by sha256) if evicted."""
    if Path(snap.meta.base_path).is_file():
        return True
    try:
        ImageCache.configured(cfg).resolve(snap.meta.image)
    except VMLoaderError:
        return False
    return Path(snap.meta.base_path).is_file()


def _stdin():
    return None if sys.stdin is None or sys.stdin.closed else sys.stdin.buffer


def _reopen(args, cfg, store, snap, session, command: tuple, env: dict, timeout=None) -> int:
    """Run `session` in the snapshot: in its running VM when `snapshot boot` has it up,
    else in a fresh boot on a throwaway overlay."""
    info = sessions.booted(snap)
    if info is not None:
        with sessions.attach(snap, info, args.root) as attached:
            attached.env.update(env)
            result = session(attached, sys.stdout.buffer, sys.stderr.buffer)
        if result.error:
            print(f"vmloader: {result.message}", file=sys.stderr)
        return job_mod.exit_status(result)
    spec = JobSpec(image=snap.meta.image, command=command, root=args.root, timeout=timeout,
                   env={**snap.meta.env, **env}, snapshot="never", from_snapshot=snap.meta.id,
                   network=args.network, console=args.console, console_raw=args.raw)
    runner = runners.job_runner(cfg, store=store, stdin=_stdin(), session=session)
    result = runner.run(spec)
    _report(result)
    return result.exit_status


def _snapshot_exec(args, cfg, store) -> int:
    snap = store.get(args.id)
    command = _command(args)
    if not command:
        raise UsageError("no command given", hint=f"vmloader snapshot exec {args.id} -- COMMAND [ARGS...]")
    return _reopen(args, cfg, store, snap, sessions.command_session(command, _stdin(), args.timeout),
                   tuple(command), dict(args.env), args.timeout)


def _snapshot_shell(args, cfg, store) -> int:
    snap = store.get(args.id)
    return _reopen(args, cfg, store, snap, sessions.shell_session(_stdin()), ("(interactive shell)",), {})


def _snapshot_boot(args, cfg, store) -> int:
    snap = store.get(args.id)
    booted = sessions.booted(snap)
    if booted is not None:
        raise SnapshotError(f"snapshot {snap.meta.id} is already booted (pid {booted['pid']})",
                            hint=f"attach to it: vmloader snapshot shell {snap.meta.id}")
    ssh_key = None
    if args.ssh:
        ssh_key = Path(args.ssh_key) if args.ssh_key else sessions.default_ssh_key()
    for text in args.forward:
        if forward.legacy_host_port(text):
            print(f"vmloader: --forward {text}: no TCP port is opened (any local user could connect to it); "
                  f"guest port {forward.parse_forward(text).guest_port} becomes a Unix socket only you can "
                  "open (printed once booted)", file=sys.stderr)
    options = sessions.BootOptions(tuple(forward.parse_forward(f) for f in args.forward), ssh_key, args.json)
    spec = JobSpec(image=snap.meta.image, command=("(booted for debugging)",), root=args.root,
                   env=dict(snap.meta.env), snapshot="never", from_snapshot=snap.meta.id,
                   network=args.network, console=args.console, console_raw=args.raw)
    runner = runners.job_runner(cfg, store=store, session=sessions.hold_session(snap, options, cfg.jobs_dir))
    result = runner.run(spec)
    _report(result)
    if result.exit_status == 0:
        print(f"vmloader: snapshot {snap.meta.id} stopped; its throwaway overlay is gone, the snapshot is unchanged",
              file=sys.stderr)
    return result.exit_status


def _snapshot_connect(args, store) -> int:
    path: Optional[Path]
    if args.socket is not None and args.id is None:
        path = Path(args.socket)
    elif args.socket is None and args.id is not None and args.port is not None:
        snap = store.get(args.id)
        info = sessions.booted(snap)
        if info is None:
            raise SnapshotError(f"snapshot {snap.meta.id} is not booted",
                                hint=f"vmloader snapshot boot {snap.meta.id} --forward {args.port}")
        path = forward.socket_for(info, args.port)
        if path is None:
            ports = ", ".join(str(f.get("guest_port")) for f in info.get("forwards") or ()) or "none"
            raise UsageError(f"snapshot {snap.meta.id} was booted without --forward {args.port} "
                             f"(forwarded: {ports})", hint="stop that boot and boot it again with the port")
    else:
        raise UsageError("snapshot connect takes ID PORT, or --socket PATH",
                         hint="e.g. vmloader snapshot connect ID 22")
    try:
        forward.bridge(forward.open_forward(path), sys.stdin.buffer, sys.stdout.buffer)
    except Interrupted:
        pass                # ssh ends its ProxyCommand with SIGHUP: the normal end, nothing to say
    return 0


def _snapshot_diff(args, cfg, store) -> int:
    from . import snapshotdiff
    snap = store.get(args.id)
    with store.hold(snap.meta.id):          # prune and rm leave it alone meanwhile
        diff = snapshotdiff.diff(snap, _base_present(cfg, snap), everything=args.all,
                                 progress=lambda message: print(f"vmloader: {message}", file=sys.stderr))
    _emit({"snapshot": snap.meta.id, **diff.to_dict()}, args.json,
          "\n".join(diff.lines()) or f"snapshot {snap.meta.id}: no changes against its base")
    return 0


def cmd_snapshot(args, cfg) -> int:
    store = SnapshotStore(cfg.snapshots_dir)
    if args.snap_cmd == "list":
        snaps = store.list()
        text = "\n".join(f"{s.meta.id}  {s.meta.image:28} exit {s.meta.exit_status:<4} "
                         f"{'disk+memory' if s.meta.memory else 'disk':11} {' '.join(s.meta.command)}"
                         for s in snaps) or "no snapshots"
        _emit([s.to_dict() for s in snaps], args.json, text)
    elif args.snap_cmd == "show":
        snap = store.get(args.id)
        data = snap.to_dict()
        _emit(data, args.json, "\n".join(f"{k}: {v}" for k, v in sorted(data.items())))
    elif args.snap_cmd == "prune":
        policy = snapshots_mod.Retention(cfg.snapshot_max_count, cfg.snapshot_max_bytes, cfg.snapshot_max_age_days)
        pruned = store.prune(policy, dry_run=args.dry_run)
        verb = "would prune" if args.dry_run else "pruned"
        _emit([{"id": s.meta.id, "reason": why, "size_bytes": s.size_bytes() if args.dry_run else None}
               for s, why in pruned], args.json,
              "\n".join(f"{verb} {s.meta.id} ({why})" for s, why in pruned) or "nothing to prune")
    elif args.snap_cmd == "exec":
        return _snapshot_exec(args, cfg, store)
    elif args.snap_cmd == "shell":
        return _snapshot_shell(args, cfg, store)
    elif args.snap_cmd == "boot":
        return _snapshot_boot(args, cfg, store)
    elif args.snap_cmd == "diff":
        return _snapshot_diff(args, cfg, store)
    elif args.snap_cmd == "connect":
        return _snapshot_connect(args, store)
    elif args.snap_cmd == "export":
        snap = store.get(args.id)
        dest = snapshots_mod.export(snap, _base_present(cfg, snap), Path(args.output))
        _emit({"snapshot": snap.meta.id, "exported": str(dest)}, args.json,
              f"exported snapshot {snap.meta.id} to {dest} (standalone qcow2)")
    elif args.snap_cmd == "logs":
        _show_logs(store.get(args.id).logs(), args.json, args.raw)
    else:
        store.remove(args.id)
        _emit({"removed": args.id}, args.json, f"removed snapshot {args.id}")
    return 0


COMMANDS = {"cache": cmd_cache, "run": cmd_run, "hypervisors": cmd_hypervisors, "images": cmd_images, "snapshot": cmd_snapshot,
            "repo": cmd_repo, "cleanup": cmd_cleanup, "condor": cmd_condor,
            "status": cmd_status}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="vmloader: %(message)s")
    virt.silence_libvirt_errors()
    stopsignals.install()       # a running job's VM is still stopped and its state kept
    try:
        cfg = config_mod.load()
        return COMMANDS[args.cmd](args, cfg)
    except Reported as exc:
        if args.debug:
            raise
        print(exc.user_text(), file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps(exc.to_dict(), indent=2))
        return exc.exit_code
    except Exception as exc:          # never let a vmloader bug pass for the job's own exit status
        if args.debug:
            raise
        print(f"vmloader: internal error: {type(exc).__name__}: {exc}\n"
              "hint: this is a vmloader bug; rerun with --debug for the traceback", file=sys.stderr)
        return EXIT_INFRA


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()

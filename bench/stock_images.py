#!/usr/bin/env python3
"""Benchmark: stock cloud images through vmloader beside their own boot (issue 12).

For each stock test image of tests/integration/stockimage.py (`--images`; default all that are
built, or buildable as root), side by side in one run: the image's own boot to its login prompt
(a bare `qemu-system-x86_64` of a throwaway overlay, with the machine vmloader's domain XML gives
it: i440fx, TCG with a 64 MiB translation cache, qemu64, the image's cpus and memory, SeaBIOS or
OVMF with a copy of the variable store, a NIC that reaches nothing, serial to a pipe; an image
with cloud-init gets a NoCloud seed asking nothing of it, as any cloud gives it a datasource, so its
cloud-init runs its stages in the baseline too); then `vmloader run --image X --cold --snapshot never --json -- true` after `images add` of
a copy into the bench's own temporary cache and state: the first job of the image (the delivery
probed) and a second one (the delivery remembered, deliverymemory.py). Time to agent is the
run's define + boot phases; the ratio is that over the own boot (the issue's target: delivery
adds at most 20 %). Then, for images booted by SeaBIOS, warm start (the default): a job that
builds the image's warm state, then `run -- true` restored from it. Our own debian-12 beside them (cold; its baseline is the bare boot of its
kernel+initrd to power-off, run_overhead.py: it has no login prompt). Not a test: no
thresholds, just figures (write them into the README).

    PYTHONPATH=$PWD python3 bench/stock_images.py --rounds 2     # as root, from the repo root
"""
import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmloader.bootstrapper import cidata, config, firmware
from vmloader.bootstrapper.cache import ImageCache

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))         # tests.integration.stockimage: builds and finds the stock images
from run_overhead import bare_boot  # noqa: E402
from tests.integration import stockimage  # noqa: E402

STOCK = ("bookworm-bios", "bookworm-bios-qga-only", "bookworm-bios-xfs-qga-only", "trixie-uefi")
PASSED_ENV = ("PYTHONPATH", "VMLOADER_CONFIG")
LOGIN = b" login:"                 # getty's prompt on the serial console ("localhost login: ")
BOOT_DEADLINE = 900                # a stock boot under TCG on a busy host takes minutes


def stock_disk(name: str):
    """The built image's qcow2, built now when absent and we are root; None when it cannot be."""
    recipe = stockimage.RECIPES[name]
    built = stockimage.CACHE / f"{name}-{stockimage.recipe_hash(recipe)}.qcow2"
    if built.exists():
        return built
    if os.geteuid() != 0:
        return None
    return stockimage.build(recipe)


def own_boot(disk: Path, firmware_kind: str, cpus: int, memory_mib: int, accel: str, seed: bool) -> float:
    """Seconds from starting QEMU on a throwaway overlay of `disk` until the serial console shows
    the login prompt; with `seed`, a NoCloud seed whose user-data asks nothing."""
    with tempfile.TemporaryDirectory(prefix="stockbench-boot-") as tmp:
        overlay = Path(tmp) / "overlay.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "qcow2", str(overlay)],
                       check=True)
        argv = ["qemu-system-x86_64", "-machine", "pc,graphics=off",
                "-accel", f"{accel},tb-size=64" if accel == "tcg" else accel, "-cpu", "qemu64",
                "-m", str(memory_mib), "-smp", str(cpus), "-display", "none", "-nodefaults", "-no-user-config",
                "-rtc", "base=utc", "-boot", "strict=on", "-no-reboot",
                "-drive", f"file={overlay},if=virtio,format=qcow2",
                "-device", "virtio-rng-pci",
                "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0,romfile=",
                "-serial", "stdio"]
        if seed:
            cidata.make_seed(Path(tmp) / "seed.img", "stockbench", "stockbench", user_data_text="#cloud-config\n{}\n")
            argv += ["-drive", f"file={Path(tmp) / 'seed.img'},if=virtio,format=raw,readonly=on",
                     "-smbios", f"type=1,serial={cidata.SMBIOS_SERIAL}"]
        if firmware_kind == "uefi":
            variables = Path(tmp) / "OVMF_VARS.fd"
            code = firmware.uefi_vars_copy(variables)
            argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={variables}"]
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        try:
            return started_to_login(proc, started)
        finally:
            proc.kill()
            proc.wait()


def started_to_login(proc: subprocess.Popen, started: float) -> float:
    fd = proc.stdout.fileno()
    tail = b""
    while True:
        left = started + BOOT_DEADLINE - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError(f"no login prompt within {BOOT_DEADLINE} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RuntimeError(f"QEMU ended before the login prompt (status {proc.wait()})")
        tail = tail[-len(LOGIN):] + chunk
        if LOGIN in tail:
            return time.monotonic() - started


def cli(env: dict, *args: str) -> tuple:
    """(wall seconds, parsed --json output) of one vmloader CLI run."""
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "vmloader.bootstrapper.cli", *args], stdout=subprocess.PIPE,
                         check=True, env=env, timeout=BOOT_DEADLINE + 300).stdout
    return time.monotonic() - started, json.loads(out)


def run_true(env: dict, image: str, cold: bool = True) -> dict:
    seconds, result = cli(env, "run", "--image", image, *(["--cold"] if cold else []), "--snapshot", "never",
                          "--json", "--", "true")
    timings = result["timings"]
    return {"wall": seconds, "agent": timings.get("define", 0.0) + timings.get("boot", 0.0),
            "delivery": result.get("agent_delivery") or "?", "remembered": bool(result.get("agent_delivery_remembered")),
            "start": result.get("start"), "build": timings.get("warm build", 0.0)}


def warm_runs(env: dict, image: str, work: Path) -> tuple:
    """(the job that builds the warm state, the next one restored from it); the state dropped first."""
    shutil.rmtree(work / "cache" / "warm", ignore_errors=True)
    return run_true(env, image, cold=False), run_true(env, image, cold=False)


def make_env(cache: Path, state: Path) -> dict:
    env = {"VMLOADER_CACHE_DIR": str(cache), "VMLOADER_STATE_DIR": str(state),
           "VMLOADER_BOOT_TIMEOUT": str(BOOT_DEADLINE), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    env.update({k: v for k, v in os.environ.items() if k in PASSED_ENV})
    return env


def add_stock(env: dict, name: str, disk: Path, work: Path) -> dict:
    """`images add stock-NAME` of a copy of the built image: its catalogue entry."""
    copy = work / f"{name}.qcow2"
    shutil.copyfile(disk, copy)
    _, entry = cli(env, "images", "add", f"stock-{name}", "--disk", str(copy), "--json")
    copy.unlink(missing_ok=True)
    return entry


def say(name: str, row: dict) -> None:
    """Each round's figures as they come (stderr), so a run cut short still tells something."""
    figures = {key: (values[-1] if isinstance(values[-1], float) else
                     {k: round(v, 2) if isinstance(v, float) else v for k, v in values[-1].items()})
               for key, values in row.items() if values}
    print(f"{name}: {figures} (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)


def med(values: list) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accel", default="tcg", help="accelerator for the bare boots (tcg here: KVM is PVM)")
    parser.add_argument("--images", default=",".join(STOCK),
                        help=f"comma-separated stock images (default: {','.join(STOCK)}, those built or buildable)")
    parser.add_argument("--no-debian-12", action="store_true", help="leave out our own debian-12 beside them")
    args = parser.parse_args()
    names = [n for n in args.images.split(",") if n]
    unknown = [n for n in names if n not in stockimage.RECIPES]
    if unknown:
        parser.error(f"unknown stock image(s) {', '.join(unknown)}; known: {', '.join(stockimage.RECIPES)}")
    load_before = os.getloadavg()
    disks = {}
    for name in names:
        disk = stock_disk(name)
        if disk is None:
            print(f"skipping {name}: not built, and building it needs root", file=sys.stderr)
        else:
            disks[name] = disk
    rows = {name: {"own": [], "first": [], "again": [], "building": [], "warm": []} for name in disks}
    ours = {"own": [], "first": []}
    with tempfile.TemporaryDirectory(prefix="stockbench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o711)             # QEMU's user (root's jobs run under qemu:///system) reaches the job dirs
        env = make_env(work / "cache", work / "state")
        entries = {name: add_stock(env, name, disk, work) for name, disk in disks.items()}
        own_env = make_env(config.load().cache_dir, work / "own-state")
        for _ in range(args.rounds):
            for name, disk in disks.items():
                entry = entries[name]
                defaults = entry.get("defaults", {})
                cloud_init = "cloud-init" not in stockimage.RECIPES[name].get("purge", [])
                rows[name]["own"].append(own_boot(disk, entry["boot"], int(defaults.get("cpus", 1)),
                                                  int(defaults.get("memory_mib", 1024)), args.accel, cloud_init))
                shutil.rmtree(work / "state" / "deliveries", ignore_errors=True)     # a first job: probed
                rows[name]["first"].append(run_true(env, f"stock-{name}"))
                rows[name]["again"].append(run_true(env, f"stock-{name}"))
                if entry["boot"] == "bios":
                    building, warm = warm_runs(env, f"stock-{name}", work)
                    rows[name]["building"].append(building)
                    rows[name]["warm"].append(warm)
                say(name, rows[name])
            if not args.no_debian_12:
                image = ImageCache(config.load().cache_dir).resolve("debian-12")
                ours["own"].append(bare_boot(image, args.accel))
                ours["first"].append(run_true(own_env, "debian-12"))
                say("debian-12", ours)
    print_table(args.rounds, rows, ours, load_before, os.getloadavg())


def print_table(rounds: int, rows: dict, ours: dict, load_before: tuple, load_after: tuple) -> None:
    print(f"stock images, {rounds} rounds, medians (s); load average (1/5/15 min) "
          f"{'/'.join(f'{x:.2f}' for x in load_before)} before, {'/'.join(f'{x:.2f}' for x in load_after)} after")
    head = (f"  {'image':28} {'delivery':17} {'own boot':>9} {'to agent':>9} {'ratio':>6} {'remembered':>10} "
            f"{'ratio':>6} {'run wall':>9} {'remembered':>10}")
    print(head)
    print(f"  {'':28} {'':17} {'(login:)':>9} {'1st job':>9} {'':>6} {'to agent':>10} {'':>6} "
          f"{'1st job':>9} {'run wall':>10}")
    for name, row in rows.items():
        own = med(row["own"])
        first, again = row["first"], row["again"]
        deliveries = sorted({r["delivery"] for r in first + again})
        if not all(r["remembered"] for r in again):
            deliveries.append("(2nd not remembered)")
        print(f"  {name:28} {','.join(deliveries):17} {own:9.2f} {med([r['agent'] for r in first]):9.2f} "
              f"{med([r['agent'] for r in first]) / own:6.2f} {med([r['agent'] for r in again]):10.2f} "
              f"{med([r['agent'] for r in again]) / own:6.2f} {med([r['wall'] for r in first]):9.2f} "
              f"{med([r['wall'] for r in again]):10.2f}")
    warm = {name: row for name, row in rows.items() if row["warm"]}
    if warm:
        print(f"  warm start (SeaBIOS images): {'image':28} {'1st job (builds)':>16} {'warm build':>10} "
              f"{'run -- true, warm':>18} {'started warm':>12}")
        for name, row in warm.items():
            print(f"  {'':28} {name:28} {med([r['wall'] for r in row['building']]):16.2f} "
                  f"{med([r['build'] for r in row['building']]):10.2f} {med([r['wall'] for r in row['warm']]):18.2f} "
                  f"{sum(r['start'] == 'warm' for r in row['warm'])}/{len(row['warm']):>10}")
    if ours["first"]:
        own = med(ours["own"])
        agent = med([r["agent"] for r in ours["first"]])
        print(f"  {'debian-12 (ours, --cold)':28} {ours['first'][0]['delivery']:17} {own:9.2f} {agent:9.2f} "
              f"{agent / own:6.2f} {'-':>10} {'-':>6} {med([r['wall'] for r in ours['first']]):9.2f} {'-':>10}")
        print("  (debian-12's own boot: its kernel+initrd to power-off, bare: it has no login prompt)")
    print("  to agent = define + boot phases of `run --cold --snapshot never --json -- true`; ratio = to agent / "
          "own boot (images with cloud-init boot their own way with a NoCloud seed asking nothing)")


if __name__ == "__main__":
    main()

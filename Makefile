# The two commands in the README: `make demo` and `make test`. Both set up
# what is missing first and are fast when everything is already there.
VENV := .venv
VMLOADER := $(VENV)/bin/vmloader
IMAGE ?= debian-12

.PHONY: setup image demo test unit bench

setup:
	@scripts/setup-host.sh

image: setup
	@$(VMLOADER) images build $(IMAGE)

demo: image
	$(VMLOADER) run --image $(IMAGE) --snapshot always -- sh -c 'echo "kernel:   $$(uname -sr)"; echo "hostname: $$(hostname)"; echo "id:       $$(id)"'

# Byte-compiled first: the suite starts about a thousand Python processes (the CLI, other users'
# vmloader), and where PYTHONDONTWRITEBYTECODE is set (this machine's environment sets it) each
# would compile vmloader from source again, about 0.15 s of CPU each (__pycache__ is git-ignored).
# mypy then: a type error fails in seconds, before any image is built or VM boots ([tool.mypy] in
# pyproject.toml).
# The unit tests (eight at a time: many wait on purpose, for a fake's timeout) then start in the
# background, beside the image's build (on a fresh machine a minute of debootstrap that keeps one
# core busy, not two) and the VM tests; they use no libvirtd, no image and no VM, and their output
# is shown at the end (`make unit` alone for a quick answer).
# Once debian-12 is built, what later tests would otherwise build first on a fresh machine is begun
# in the background too (scripts/prepare-test-images: the pools' debian-11/13, the stock images, in
# the order their tests need them; begun beside debian-12's own build, they slowed its downloads by
# half a minute), in a process group of its own, ended with the suite.
# The few VM tests that disturb every VM on the host (`serial`: libvirtd restarted) run first,
# where no other VM runs.
# The VM tests run $(VM_WORKERS) at a time on this two-core machine (much of a VM test is waiting:
# HTCondor's cycles, a guest's timeouts, disk), a module on one worker (`--dist loadfile`: a
# module's fixtures, such as the HTCondor pool, are made once; the warm-start module's lanes are
# its own), the longest modules first (tests/integration/conftest.py). The slowest are listed at
# the end (where the suite's minutes go).
PYTEST := $(VENV)/bin/python -m pytest -q -p no:cacheprovider
VM_WORKERS ?= 4
test: setup
	$(VENV)/bin/python -m compileall -q vmloader tests
	$(VENV)/bin/python -m mypy vmloader
	@unit_log=$$(mktemp); prepare_log=$$(mktemp); prepared=; \
	$(PYTEST) -n 8 tests/unit >"$$unit_log" 2>&1 & unit=$$!; \
	stop() { [ -z "$$unit" ] || kill $$unit 2>/dev/null; [ -z "$$prepared" ] || kill -- -$$prepared 2>/dev/null; \
	         unit=; prepared=; rm -f "$$unit_log" "$$prepare_log"; }; \
	trap stop EXIT; trap 'stop; exit 130' INT; trap 'stop; exit 143' TERM; \
	$(VMLOADER) images build $(IMAGE) && \
	{ if [ "$$(id -u)" = 0 ]; then setsid scripts/prepare-test-images >"$$prepare_log" 2>&1 & prepared=$$!; fi; \
	  $(PYTEST) -m serial tests/integration && \
	  $(PYTEST) -n $(VM_WORKERS) --dist loadfile --no-loadscope-reorder -m "not serial" --durations=30 tests/integration; }; \
	vm=$$?; wait $$unit; unit_status=$$?; unit=; \
	echo "unit tests (beside the image build and the VM tests):"; cat "$$unit_log"; \
	if [ $$vm = 0 ] && [ -n "$$prepared" ]; then wait $$prepared || { tail -n 20 "$$prepare_log"; \
	  echo "scripts/prepare-test-images failed (above); the tests built what it had not"; }; prepared=; fi; \
	[ $$vm = 0 ] && [ $$unit_status = 0 ]

unit: setup
	$(VENV)/bin/python -m mypy vmloader
	$(PYTEST) tests/unit

bench: image
	$(VENV)/bin/python bench/warm_start.py
	$(VENV)/bin/python bench/run_overhead.py
	$(VENV)/bin/python bench/pull_throughput.py
	$(VENV)/bin/python bench/snapshot_times.py
	$(VENV)/bin/python bench/shell_prompt.py
	$(VENV)/bin/python bench/condor_throughput.py --warm
	$(VENV)/bin/python bench/ssh_to_job.py
	$(VENV)/bin/python bench/stock_images.py

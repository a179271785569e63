# The two commands in the README: `make demo` and `make test`. Both set up
# what is missing first and are fast when everything is already there.
VENV := .venv
VMLOADER := $(VENV)/bin/vmloader
IMAGE ?= debian-12

.PHONY: setup image demo test suite unit bench

setup:
	@scripts/setup-host.sh

image: setup
	@$(VMLOADER) images build $(IMAGE)

demo: image
	$(VMLOADER) run --image $(IMAGE) --snapshot always -- sh -c 'echo "kernel:   $$(uname -sr)"; echo "hostname: $$(hostname)"; echo "id:       $$(id)"'

# Byte-compiled first: the suite starts about a thousand Python processes (the CLI, other users'
# vmloader), and where PYTHONDONTWRITEBYTECODE is set (this machine's environment sets it) each
# would compile vmloader from source again, about 0.15 s of CPU each (__pycache__ is git-ignored).
# mypy then: a type error fails in seconds, before any VM boots ([tool.mypy] in pyproject.toml).
# Unit tests (eight at a time: many wait on purpose, for a fake's timeout) in processes of their
# own, beside the VM tests: they use no libvirtd and no VM, and nothing a VM test leaves in its
# process (signal handlers, threads) reaches the fakes; their output is shown once the VM tests end
# (`make unit` alone for a quick answer). Beside the VM tests, not before them: started first they
# held the VM tests back by their length (about 45 s) on a machine that was not yet busy.
# The few VM tests that disturb every VM on the host (`serial`: libvirtd restarted) run first,
# where no other VM runs.
# The VM tests run $(VM_WORKERS) at a time on this two-core machine (much of a VM test is waiting:
# HTCondor's cycles, a guest's timeouts, disk), a module on one worker (`--dist loadfile`: a
# module's fixtures, such as the HTCondor pool, are made once; the warm-start module's lanes are
# its own), the longest modules first (tests/integration/conftest.py). The slowest are listed at
# the end (where the suite's minutes go).
PYTEST := $(VENV)/bin/python -m pytest -q -p no:cacheprovider
VM_WORKERS ?= 4
# On a fresh machine the images and trees later tests build first (scripts/prepare-test-images) are
# begun once debian-12 is built, beside the first tests, where a core idled (begun before, beside
# debian-12's own build, they slowed its downloads by half a minute). In a process group of its own,
# ended with the suite.
test: image
	@prepared=; log=$$(mktemp); \
	if [ "$$(id -u)" = 0 ]; then setsid scripts/prepare-test-images >"$$log" 2>&1 & prepared=$$!; fi; \
	stop() { [ -z "$$prepared" ] || kill -- -$$prepared 2>/dev/null; prepared=; rm -f "$$log"; }; \
	trap stop EXIT; trap 'stop; exit 130' INT; trap 'stop; exit 143' TERM; \
	$(MAKE) --no-print-directory suite || exit $$?; \
	if [ -n "$$prepared" ] && ! wait $$prepared; then echo "scripts/prepare-test-images:"; tail -n 20 "$$log"; fi; \
	prepared=

suite:
	$(VENV)/bin/python -m compileall -q vmloader tests
	$(VENV)/bin/python -m mypy vmloader
	@log=$$(mktemp); $(PYTEST) -n 8 tests/unit >"$$log" 2>&1 & unit=$$!; \
	trap 'kill $$unit 2>/dev/null; rm -f "$$log"' INT TERM; \
	$(PYTEST) -m serial tests/integration && \
	$(PYTEST) -n $(VM_WORKERS) --dist loadfile --no-loadscope-reorder -m "not serial" --durations=30 tests/integration; \
	vm=$$?; wait $$unit; unit=$$?; \
	echo "unit tests (beside the VM tests):"; cat "$$log"; rm -f "$$log"; \
	[ $$vm = 0 ] && [ $$unit = 0 ]

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

# vfio-irqd — the two commands a new machine needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
SOURCES := proto/irqproto daemon/irqd tests bench

.PHONY: all install run test lint typecheck pytest bench clean

all: test

# The virtualenv is rebuilt when the project's metadata or native code changes.
$(STAMP): pyproject.toml setup.py daemon/irqd/_drain.c daemon/irqd/_hotloop.c
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "vfio-irqd needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict proto/irqproto daemon/irqd tests bench

pytest: $(STAMP) test-tools
	$(PY) -m pytest

# tmux (the terminal test of `top`), cc and node/npm (the foreign clients),
# systemd-analyze and systemd-socket-activate (the unit tests): installed from
# Debian's packages when missing and we are root.
.PHONY: test-tools
test-tools:
	bash scripts/install-test-tools

test: lint typecheck pytest

# Starts the daemon on the simulated device, fires interrupts at it from another
# process and watches them arrive; Ctrl-C stops everything.
run: $(STAMP)
	$(PY) -m irqd.tools.demo

# The native extensions built with AddressSanitizer and UBSan into build/asan
# (the in-place build is left alone) and their tests run against that build;
# any sanitizer report fails it. See scripts/test-native.
.PHONY: test-native
test-native: $(STAMP)
	PY=$(PY) bash scripts/test-native

bench: $(STAMP)
	$(PY) bench/run.py

# The decoder fuzz target for FUZZ_SECONDS: atheris (coverage-guided) when it
# installs, else hypothesis at scale. `make test` runs it briefly.
.PHONY: fuzz
FUZZ_SECONDS ?= 120
fuzz: $(STAMP)
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install --quiet -e '.[fuzz]' || true
	$(PY) -m tests.security.fuzz_decoder -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1

# 64 client processes connecting, subscribing and leaving (some SIGKILLed) for
# SOAK_CYCLES connection cycles while interrupts fire; checks exact counts and a
# flat fd count and RSS. Bounded by SOAK_SECONDS. `make test` runs a short one.
.PHONY: soak
SOAK_CYCLES ?= 10000
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(PY) bench/soak.py --clients 64 --cycles $(SOAK_CYCLES) --max-seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
	find . -name '*.so' -delete

# vfio-irqd — the two commands a new machine needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
SOURCES := proto/irqproto daemon/irqd tests bench examples

.PHONY: all venv install uninstall run test lint typecheck pytest bench clean

all: test

# The development virtualenv (editable, with the test tools) that every target
# below uses; rebuilt when the project's metadata or native code changes.
$(STAMP): pyproject.toml setup.py daemon/irqd/_drain.c daemon/irqd/_hotloop.c
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "vfio-irqd needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict proto/irqproto daemon/irqd tests bench examples

# Every test, the VM stage and the soak included: with VFIO_IRQD_FULL_SUITE=1
# the run refuses to start if anything would be deselected (-m, -k, PYTEST_ADDOPTS)
# or no VM test is collected (tests/conftest.py). For part of the suite, call
# pytest yourself: .venv/bin/python -m pytest -m "not vm and not soak".
pytest: $(STAMP) test-tools
	VFIO_IRQD_FULL_SUITE=1 $(PY) -m pytest

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
	$(PY) bench/control.py

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

# -- make install / make uninstall --------------------------------------------
# As daemons installed from source do: under PREFIX, staged into DESTDIR when
# set (a package build), e.g. `make install PREFIX=/usr DESTDIR=/tmp/pkg`.
#
#   $(PREFIX)/lib/vfio-irqd/venv    the program in its own virtualenv, built
#                                   from this checkout (not editable)
#   $(PREFIX)/bin/vfio-irqd         a link to the virtualenv's command
#   UNITDIR, SYSUSERSDIR, TMPFILESDIR   the units (ExecStart= rewritten to
#                                   $(PREFIX)/bin/vfio-irqd), sysusers.d and
#                                   tmpfiles.d files, as vfio-irqd*.
#   $(PREFIX)/share/man/man8/vfio-irqd.8
#
# systemd reads units, sysusers.d and tmpfiles.d from /usr/lib/... and
# /usr/local/lib/... (systemd.unit(5), sysusers.d(5), tmpfiles.d(5);
# `systemd-analyze unit-paths`), so those two prefixes install there; for any
# other prefix they go to /etc, the administrator's directories.
#
# The service runs with ProtectHome=yes, so the virtualenv's interpreter must
# not live in a home directory (pyenv and the like): PYTHON=/usr/bin/python3.
# Without DESTDIR, install also does what a package's postinst does: it runs
# systemd-sysusers and systemd-tmpfiles on the new files and, when systemd is
# running, `systemctl daemon-reload`.
PREFIX  ?= /usr/local
DESTDIR ?=
BINDIR  ?= $(PREFIX)/bin
PKGLIBDIR ?= $(PREFIX)/lib/vfio-irqd
MANDIR  ?= $(PREFIX)/share/man
ifneq ($(filter /usr /usr/local,$(PREFIX)),)
SYSTEMD_BASE := $(PREFIX)/lib
else
SYSTEMD_BASE := /etc
endif
UNITDIR     ?= $(SYSTEMD_BASE)/systemd/system
SYSUSERSDIR ?= $(SYSTEMD_BASE)/sysusers.d
TMPFILESDIR ?= $(SYSTEMD_BASE)/tmpfiles.d
# Extra arguments for pip, e.g. --no-index --find-links DIR for an offline build.
PIP_INSTALL_FLAGS ?=

UNIT_FILES := vfio-irqd@.service vfio-irqd@.socket vfio-irqd-sim.service
# Absolute and without a trailing slash, so that it can be stripped from paths.
DEST    := $(abspath $(DESTDIR))
VENVDIR := $(PKGLIBDIR)/venv
# Built beside the old one and swapped in at the end (two renames): a daemon
# started meanwhile never finds a half-written virtualenv, and a failed build
# leaves the old one alone.
NEWVENV := $(DEST)$(VENVDIR).new

install:
	@case '$(PREFIX)' in /*) ;; *) echo 'make install: PREFIX must be an absolute path' >&2; exit 2;; esac
	@$(PYTHON) -c 'import os, sys; exe = os.path.realpath(sys._base_executable); \
	    sys.exit("vfio-irqd needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" \
	        if sys.version_info < (3, 11) else \
	        f"make install: {exe} is in a home directory, which the service cannot see " \
	        "(ProtectHome=yes); use a system Python, e.g. make install PYTHON=/usr/bin/python3" \
	        if exe.startswith(("/home/", "/root/", "/run/user/")) else 0)'
	rm -rf '$(NEWVENV)'
	$(PYTHON) -m venv '$(NEWVENV)'
	@# pip builds in build/, where setuptools never removes a module the checkout
	@# no longer has: start from nothing, or a deleted module gets installed.
	rm -rf build/lib build/lib.* build/bdist.*
	'$(NEWVENV)/bin/python' -m pip install --quiet --no-compile $(PIP_INSTALL_FLAGS) .
	@# venv and pip write the directory they were given into the scripts' #! lines,
	@# activate and pyvenv.cfg: make that the final one.
	grep -rlIF -e '$(NEWVENV)' '$(NEWVENV)' | xargs -r sed -i 's|$(NEWVENV)|$(VENVDIR)|g'
	@# Byte code up front, named by the final paths: the service's file system is
	@# read-only (ProtectSystem=strict), so it could never write its own. pip and
	@# setuptools are not the daemon's: their byte code (named by the build
	@# paths) goes, and comes back named right the first time pip runs.
	@# (The interpreter that compiles must not write any itself: it imports
	@# _distutils_hack from a .pth file at start-up.)
	find '$(NEWVENV)' -name __pycache__ -prune -exec rm -rf {} +
	PYTHONDONTWRITEBYTECODE=1 '$(NEWVENV)/bin/python' -m compileall -q -j0 \
	    -s '$(NEWVENV)' -p '$(VENVDIR)' \
	    -x '/site-packages/(pip|setuptools|pkg_resources)/' '$(NEWVENV)/lib'
	rm -rf '$(DEST)$(VENVDIR).old'
	if [ -e '$(DEST)$(VENVDIR)' ]; then mv '$(DEST)$(VENVDIR)' '$(DEST)$(VENVDIR).old'; fi
	mv '$(NEWVENV)' '$(DEST)$(VENVDIR)'
	rm -rf '$(DEST)$(VENVDIR).old'
	install -d '$(DEST)$(BINDIR)'
	ln -sfn "$$(realpath -ms --relative-to='$(BINDIR)' '$(VENVDIR)/bin/vfio-irqd')" \
	    '$(DEST)$(BINDIR)/vfio-irqd'
	install -d '$(DEST)$(UNITDIR)'
	for unit in $(UNIT_FILES); do \
	    sed 's|^ExecStart=/usr/bin/vfio-irqd |ExecStart=$(BINDIR)/vfio-irqd |' \
	        "systemd/$$unit" > '$(DEST)$(UNITDIR)'"/$$unit" && \
	    chmod 644 '$(DEST)$(UNITDIR)'"/$$unit" || exit 1; \
	done
	install -D -m 644 systemd/vfio-irqd.sysusers.conf '$(DEST)$(SYSUSERSDIR)/vfio-irqd.conf'
	install -D -m 644 systemd/vfio-irqd.tmpfiles.conf '$(DEST)$(TMPFILESDIR)/vfio-irqd.conf'
	install -D -m 644 docs/vfio-irqd.8 '$(DEST)$(MANDIR)/man8/vfio-irqd.8'
ifeq ($(DEST),)
	-systemd-sysusers '$(SYSUSERSDIR)/vfio-irqd.conf'
	-systemd-tmpfiles --create '$(TMPFILESDIR)/vfio-irqd.conf'
	-if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
endif

# Leaves the group (files may still belong to it) and /run/vfio-irqd; stop the
# services first.
uninstall:
	rm -f '$(DEST)$(BINDIR)/vfio-irqd'
	rm -rf '$(DEST)$(VENVDIR)' '$(DEST)$(VENVDIR).new' '$(DEST)$(VENVDIR).old'
	if [ -d '$(DEST)$(PKGLIBDIR)' ]; then rmdir --ignore-fail-on-non-empty '$(DEST)$(PKGLIBDIR)'; fi
	rm -f $(foreach unit,$(UNIT_FILES),'$(DEST)$(UNITDIR)/$(unit)')
	rm -f '$(DEST)$(SYSUSERSDIR)/vfio-irqd.conf' '$(DEST)$(TMPFILESDIR)/vfio-irqd.conf'
	rm -f '$(DEST)$(MANDIR)/man8/vfio-irqd.8'
ifeq ($(DEST),)
	-if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
endif

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
	find . -name '*.so' -delete

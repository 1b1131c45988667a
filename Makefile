# The two set-up commands (README): `make demo` runs the main job end to end on
# the demo model; `make test` runs the tests. Each creates or reuses .venv and
# installs everything it needs, Debian packages included.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
ARCH := $(shell uname -m)
# torch/torchvision builds that exist for this machine (see README, "Install").
ifeq ($(ARCH),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif
# Debian packages: python3-venv (`python3 -m venv` needs it on Debian/Ubuntu: .venv and the wheel test),
# and what the tests use: rsync + sshd on loopback, systemd-nspawn.
DEB_PACKAGES := python3-venv rsync openssh-server openssh-client systemd-container
# A private one-node Slurm for the job-array tests (tests/slurm_harness.py).
DEB_PACKAGES_SLURM := munge slurmctld slurmd slurm-client
DEB_PACKAGES += $(DEB_PACKAGES_SLURM)
PYTEST_ARGS ?=

.PHONY: all venv system-deps demo test test-fast bench-cpu lint clean

all: test

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/pip || $(PYTHON) -m venv $(VENV) || \
	  { $(MAKE) system-deps DEB_PACKAGES=python3-venv && $(PYTHON) -m venv --clear $(VENV); }
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[daemon,test]'
	touch $@

venv: $(VENV)/.installed

system-deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

demo: venv
	$(VENV)/bin/htrctl demo

test: system-deps venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not systemd and not ssh and not slurm and not slow" $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check htrctl daemon tests bench || true

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

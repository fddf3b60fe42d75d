# The two commands a user needs: `make demo` and `make test`. Both create .venv when missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tskd-installed
CORES  ?= 2
PRESET ?= smoke
# A GPU workstation: GPUS=8 runs at most 8 x JOBS_PER_GPU training jobs at once, each on a GPU of
# its own (tskd/launch/gpus.py); JOBS_PER_GPU=2 lets two small CIFAR jobs share one.
GPUS   ?=
JOBS_PER_GPU ?= 1

.PHONY: demo test test-fast lint venv cxx browser clean

venv: $(STAMP)

# Reinstall when the dependencies change. torch/torchvision are pinned to the builds that lie on
# the project's machines (pip takes them from disk; any other version downloads gigabytes).
$(STAMP): pyproject.toml
	@test -x $(PY) || { PYBIN=$$(command -v python3.11 || command -v python3); \
	  $$PYBIN -c 'import sys; assert sys.version_info >= (3, 11), "tskd needs Python >= 3.11"' && \
	  $$PYBIN -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# The whole DAG on the smoke preset: synthetic data -> teacher -> students -> evaluation -> report.
demo: $(STAMP)
	TSKD_JOBS_PER_GPU=$(JOBS_PER_GPU) $(VENV)/bin/snakemake --cores $(CORES) \
	  $(if $(GPUS),--resources gpus=$$(( $(GPUS) * $(JOBS_PER_GPU) ))) --configfile params/$(PRESET).yaml
	@cat results/$(PRESET)/report.md

# Debian packages the full suite uses, installed where this user may (root, or passwordless sudo).
# Elsewhere nothing is installed and the tests that need the package skip, saying so.
AS_ROOT = $(shell [ "$$(id -u)" = 0 ] && echo " " || { sudo -n true 2>/dev/null && echo "sudo"; })
define apt_install
	@command -v $(1) >/dev/null 2>&1 || { \
	  if [ -z "$(AS_ROOT)" ]; then echo "$(1) missing and no root or passwordless sudo: the tests that need it skip"; \
	  else echo "installing $(2) (apt-get)"; \
	    $(AS_ROOT) apt-get update -qq && $(AS_ROOT) apt-get install -y -qq --no-install-recommends $(2) >/dev/null; fi; }
endef

# A C++ compiler: torch.compile builds TSKD's CPU kernels with it (`methods.tskd.compile: true`,
# tests/test_tskd_compiled.py).
cxx:
	$(call apt_install,g++,g++)

# A headless browser: tests/test_workflow.py and tests/test_scale_grid.py check MLflow's UI in it.
browser:
	$(call apt_install,chromium,chromium)

# The full suite, as CI runs it: one worker, in file order. `make test WORKERS=4` runs it on
# pytest-xdist workers, a module per worker (--dist loadscope), one module at a time on the local
# SLURM cluster (a lock in tests/slurm_fixtures.py). On 2 cores two workers were slower (2693 s
# against 2452 s): the smoke DAGs each use both cores already (docs/testing.md).
WORKERS ?= 1
PYTEST = $(VENV)/bin/pytest -q -p no:randomly --durations=20 $(if $(filter-out 1,$(WORKERS)),-n $(WORKERS) --dist loadscope)
test: $(STAMP) cxx browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PYTEST)

# The inner loop: every unit test and one training step of every method, no end-to-end DAG.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PYTEST) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports  # the layers of docs/architecture.md (.importlinter)
	$(VENV)/bin/snakemake --lint --configfile params/smoke.yaml

clean:
	rm -rf results .snakemake mlflow.db mlflow.db.lock mlflow.db.tskd-setup.json mlartifacts

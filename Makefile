# `make demo` and `make test` each create .venv when missing, install the pinned dependencies, and run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.progfl-installed

.PHONY: demo test bench arm-check executorch-check mutation clean

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[export,data,flower,bench,dev]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps animal-mnist==0.4
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/progfl demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/stage_memory.py
	$(PY) benchmarks/device_step.py

# The device runtime on an emulated Raspberry Pi 4 and 5 (qemu user mode, Debian's arm64 python, PyPI's aarch64
# wheels; all cached in .arm/, nothing installed system-wide). About 5 minutes the first time, 3.5 after.
arm-check: $(STAMP)
	tools/armpi/build.sh .arm
	$(PY) tools/armpi/arm_check.py .arm

# EXPERIMENTAL ExecuTorch backend: its own venv (.et-venv, ~1.5 GB: executorch pulls torchao, coremltools, ...),
# exports with --backends ort,torch,executorch, parity with the torch backend, step time and peak against ORT and
# torch; writes benchmarks/results/executorch.md.
executorch-check:
	tools/executorch/setup.sh .et-venv
	PYTHONPATH=$(CURDIR) .et-venv/bin/python tools/executorch/check.py

# Mutation testing (issue 13; not part of `make test`): mutmut over server/aggregate.py, server/pace.py,
# server/selection.py, models/losses.py and device_runtime/trainer.py with the fast tests listed in setup.cfg's
# [mutmut] section, then the score per file (killed / mutants) and every mutant not killed. A fresh run each time
# (mutmut would otherwise keep stale copies of the package in mutants/). OMP_NUM_THREADS=1: mutmut forks a worker
# per mutant from a process that ran torch, and a fork after torch's OpenMP pool started hangs at its first op.
MUTATION_CHILDREN ?= 2
mutation: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[mutation]"
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATION_CHILDREN)
	$(PY) tools/mutation_score.py --list all-not-killed

clean:
	rm -rf $(VENV) runs benchmarks/out .arm .et-venv mutants .hypothesis

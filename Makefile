# `make demo` and `make test` each create .venv when missing, install the pinned dependencies, and run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.progfl-installed

.PHONY: demo test bench clean

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

clean:
	rm -rf $(VENV) runs benchmarks/out

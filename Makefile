# `make test` and `make demo` work from a clean clone: they create .venv when it is missing and install
# the project at the exact versions the tests ran with (LOCK, pip constraints).
PYTHON ?= python3
VENV := .venv
LOCK := requirements/lock-cpu.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install lock wheels test-py312 clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Two workers, one test file each at a time, so module fixtures are built once.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	$(PY) scripts/demo.py

# The versions now in VENV become LOCK (after a deliberate upgrade there); local build tags (+cpu) dropped
# so the lock also admits the same release from PyPI.
lock: $(STAMP)
	{ sed -n '/^#/p' $(LOCK); $(PY) -m pip freeze --exclude-editable | sed -e 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

# The lent GPU machines' stack (Python 3.12, jax 0.11.2, transformers 5.17) on the CPU, in its own venv:
#   make test-py312 PYTHON312=/path/to/python3.12
PYTHON312 ?= python3.12
test-py312:
	$(MAKE) test PYTHON=$(PYTHON312) VENV=.venv-py312 LOCK=requirements/lock-py312.txt

# The packages the GPU machines' image lacks, as cp312 manylinux wheels in .whl/ (see README, "On a lent GPU").
wheels:
	bash benchmarks/device_wheels.sh

clean:
	rm -rf $(VENV) .venv-py312 build *.egg-info

# `make test` and `make demo` work from a clean clone: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Two workers, one test file each at a time (module fixtures are built once); the slowest files
# are named first so that neither worker waits for the other at the end.
SLOW_TESTS := tests/test_workflow_train.py tests/test_training_processes.py tests/test_training_collectives.py

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile $(SLOW_TESTS) tests

demo: $(STAMP)
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) build *.egg-info

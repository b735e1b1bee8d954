# Two commands for a fresh machine: `make up` runs the service, `make test` runs the tests.
# Both create .venv and install what they need (again only when pyproject.toml or
# constraints.txt change).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# Machines of this kind keep the CPU build of torch in /opt/wheels; use it when there.
FIND_LINKS := $(if $(wildcard /opt/wheels/*.whl),--find-links /opt/wheels)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(FIND_LINKS) -c constraints.txt -e '.[worker,test]'
	touch $(STAMP)

.PHONY: install up test bench
install: $(STAMP)

up: $(STAMP)
	$(VENV)/bin/genq up

test: $(STAMP)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/python bench/batching.py

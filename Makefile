# Two commands do all set-up on a fresh machine with Python 3.11 and make:
#   make demo   — create .venv if missing, install, run `autopar demo`
#   make test   — same set-up, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint clean chromium gpu-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,hf,triton]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/autopar demo

# One GPU, under 8 minutes, no network: calibration, single-GPU plans predicted beside measured (time,
# memory by category), Triton attention vs SDPA flash → benchmarks/results/gpu_check.md (.json).
# Without a GPU: a dry run that lists what it would measure.
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check

test: $(STAMP) chromium
	$(BIN)/pytest -n 2 -q

# Headless Chromium for the HTML report's browser test (tests/views/test_browser.py); Debian's
# package, installed once. Without root the test says why it skipped.
chromium:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium) \
		|| echo "warning: could not install chromium; the browser test will be skipped"

# ruff, then the layer contract of docs/ARCHITECTURE.md (pyproject.toml [tool.importlinter]).
lint: $(STAMP)
	$(BIN)/ruff check autopar passes kernels cost_models tests benchmarks
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) build *.egg-info

# One entry point for newcomers and CI. `make test` and `make serve` install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test serve bench clean browser-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

serve: install
	$(VENV)/bin/patchdiff serve

bench: install
	$(PY) benchmarks/flops.py
	$(PY) benchmarks/forward.py --quick
	$(PY) benchmarks/service_overhead.py

# Debian's Chromium for tests/test_web_page.py (Playwright drives it; no browser is downloaded).
browser-deps:
	command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver)

clean:
	rm -rf $(VENV) data runs .pytest_cache

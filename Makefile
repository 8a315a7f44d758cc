# One entry point for newcomers and CI. `make test` and `make serve` install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Two installs: what serving needs (`make serve`), then the test, benchmark and docs tools on top
# (`make test`, `make install`). Each stamp is redone when pyproject.toml changes.
SERVE_STAMP := $(VENV)/.serve-stamp
TEST_STAMP := $(VENV)/.test-stamp

# torch: the version everything is tested with, and which build. cpu on a machine without
# `nvidia-smi`, else cuda (PyPI's default Linux wheel). Override: make install TORCH_VARIANT=cpu
TORCH_VERSION ?= 2.13.0
TORCH_VARIANT ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
TORCH_CPU_INDEX_URL ?= https://download.pytorch.org/whl/cpu

# make serve PORT=8080 (the API's port; default PATCHDIFF_API_PORT or 8000)
PORT ?= $(PATCHDIFF_API_PORT)
# make test BASE_PORT=20000: the tests' servers bind ports counting up from there (default: any free port)
BASE_PORT ?= $(PATCHDIFF_TEST_BASE_PORT)
# make test PYTEST_ARGS='-k docker -x'
PYTEST_ARGS ?=

.PHONY: install install-serve test serve bench soak compose-test compose-config lock clean browser-deps test-deps

# torch, then the project with its `serve` extra: core, api, worker and the embedded Redis.
$(SERVE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch alone first, without its dependencies: for cpu, a CPU wheel that pip already has on disk
	# (its configured find-links), else PyTorch's CPU index; for cuda, the default index. An unpinned
	# or default-index torch on a machine without a GPU would be the multi-GB CUDA build.
	@if [ "$(TORCH_VARIANT)" = cpu ]; then \
	  $(PIP) install --quiet --no-deps --no-index "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	  && echo "torch $(TORCH_VERSION)+cpu: the wheel on disk" \
	  || { echo "torch $(TORCH_VERSION)+cpu from $(TORCH_CPU_INDEX_URL)"; \
	       $(PIP) install --quiet --no-deps "torch==$(TORCH_VERSION)" --index-url "$(TORCH_CPU_INDEX_URL)"; }; \
	fi
	# Then torch's own dependencies (and, for cuda, torch itself) and the project, from the default index.
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e '.[serve]'
	$(PY) -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
	touch $(SERVE_STAMP)

# Everything else on top: training, tests, benchmarks, the docs site (the `all` extra).
$(TEST_STAMP): $(SERVE_STAMP)
	$(PIP) install --quiet -e '.[all]'
	touch $(TEST_STAMP)

install-serve: $(SERVE_STAMP)

install: $(TEST_STAMP)

test: install
	PATCHDIFF_TEST_BASE_PORT=$(BASE_PORT) $(PY) -m pytest -q $(PYTEST_ARGS)

serve: install-serve
	$(VENV)/bin/patchdiff serve $(if $(PORT),--port $(PORT))

bench: install
	$(PY) benchmarks/flops.py
	$(PY) benchmarks/forward.py --quick
	$(PY) benchmarks/service_overhead.py

# The standing soak, 5 minutes: jobs from 8 clients while workers are SIGKILLed and Redis restarts
# once; prints lost, stuck, duplicated, failed by cause, files valid (tests/test_soak.py: 60 s).
soak: install
	$(PY) benchmarks/soak.py --seconds 300

# The compose stack for real: images built offline from a wheelhouse, the CPU override, scaled to 2 API
# replicas and 3 workers; jobs through each, a worker killed mid-job, the metrics of the replicas, down/up.
# Needs a Docker engine and Compose v2 (.ci/setup-docker.sh).
compose-test: install
	PYTHON=$(abspath $(PY)) bash tests/compose/compose_test.sh

# `docker compose config` of both file sets (what tests/test_docker.py runs when Compose v2 is there).
compose-config:
	docker compose -f docker-compose.yml config -q
	docker compose -f docker-compose.yml -f docker-compose.cpu.yml config -q

# Regenerate docker/requirements/*.txt (the versions the images install) in throwaway venvs.
lock:
	bash docker/lock.sh

# Debian's Chromium for tests/test_web_page.py (Playwright drives it; no browser is downloaded).
browser-deps:
	command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver)

# Debian's redis-server (Sentinel included) for tests/test_sentinel.py; kubectl renders the
# Kubernetes manifests offline for tests/test_kubernetes.py (no cluster involved).
test-deps: browser-deps
	command -v redis-server >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server)

clean:
	rm -rf $(VENV) data runs .pytest_cache

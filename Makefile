# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install everything they need into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/hessdist: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

.PHONY: install demo test bench gpu
install: $(BIN)/hessdist

demo: install
	$(BIN)/hessdist eigs --example digits-mlp --which LA,SA --k 3 --json results-digits-mlp.json

# Two pytest processes (pytest-xdist), each test file whole on one of them: the files' Ray
# clusters and worker groups are set up once per file, as in a serial run. Files go out in
# collection order, the slowest first (tests/conftest.py), not xdist's by-test-count order.
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# Peer tools for benchmarks/peers.py, without their declared dependencies (see pyproject.toml).
PEERS := "pyhessian==0.1" "hessian-eigenthings==1.0.0a5" "curvlinops-for-pytorch==3.0.1" einops einconv linear_operator tqdm

bench: install
	$(BIN)/pip install -q --no-deps $(PEERS)
	$(BIN)/python -m benchmarks.run

# The device suite (benchmarks/gpu_suite.py, <= 10 min on one H100/H200): the venv's python where
# `make install` ran, else the machine's python3 (a lent device has torch but no registry); Ray
# from the ../shared/tools bundle when .devray/ was carried. $OUT, when set, gets a copy of the JSON.
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)

gpu:
	if [ -d .devray ]; then bash .devray/install.sh; fi
	PYTHONPATH=/tmp/site:$(CURDIR):$$PYTHONPATH $(GPU_PY) -m benchmarks.gpu_suite $(if $(OUT),--also-write $(OUT))

# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ciss-installed
DEMO_OUT ?= demo-out

.PHONY: venv gpu demo test test-all test-slow lint docs bench clean

venv: $(STAMP)

# torch/torchvision are pinned to the releases this project is measured with; where the machine
# does not offer them (another Python, another platform) pip falls back to the newest compatible.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1 || \
		$(BIN)/python -m pip install -q torch torchvision
	$(BIN)/python -m pip install -q -e '.[cpu,dev,smp,transformers,pretrained,annotate,docs]'
	touch $(STAMP)

# A CUDA-capable ONNX Runtime in the same venv: onnxruntime and onnxruntime-gpu install the
# same module, so the CPU one goes first (pip alone cannot replace one with the other).
gpu: $(STAMP)
	$(BIN)/python -m pip uninstall -q -y onnxruntime onnxruntime-gpu
	$(BIN)/python -m pip install -q -e '.[gpu,dev,smp,transformers,pretrained,annotate,docs]'
	$(BIN)/python -c "import onnxruntime as o; print(o.get_available_providers())"

demo: $(STAMP)
	$(BIN)/ciss demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	CISS_SLOW=1 $(BIN)/python -m pytest -q

# the store under faults: every failpoint of every command, killed and out of space (#29)
test-slow: $(STAMP)
	CISS_SLOW=1 $(BIN)/python -m pytest -q -s tests/test_failpoints.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks docs/examples

# the documentation site into site/ (open site/index.html); the tests build it with --strict too
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache build site src/*.egg-info

# make demo: run the bundled example GPT through the passes and print the report.  make test: the test suite.
# Both create .venv on first use: torch 2.13.0 (CPU build) first, so pip does not pull CUDA wheels.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch, effcompile, onnxruntime, peft, transformers" && touch $(STAMP)

# The bundled example through four passes: adapters on its projections, sparse local attention,
# bf16 casts, then rematerialisation planned on the result; written to build/demo.
demo: $(STAMP)
	$(BIN)/effcompile examples/gpt.py --passes lora,sas,amp,remat --set lora.targets=qkv,proj \
		--set sas.block_size=16 --set sas.window=32 --set remat.budget=0.7 --out build/demo --force

# Two workers (pytest-xdist) fill CI's two cores: the suite is mostly single-threaded Python. A module's
# tests stay on one worker, so its fixtures are built once. JOBS=1 runs it in one process.
JOBS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(if $(filter 1,$(JOBS)),,-n $(JOBS) --dist loadscope) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check rewrite passes tests tools examples

clean:
	rm -rf build $(VENV)

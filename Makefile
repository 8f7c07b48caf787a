# Every target works on a fresh clone: it creates .venv when absent, installs torch==2.13.0 there
# when no torch is importable (the CPU wheel on disk; a bare `torch` would pull a CUDA build),
# installs the project, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo demo-docs test bench bench-gpu docs lint mutation venv install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)

venv: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"

install: venv
	$(PIP) install -q -e ".[exp]"

install-dev: venv
	$(PIP) install -q -e ".[dev]"

demo: install
	$(VENV)/bin/steadystep demo --out runs/demo

# The committed copy of the demo (docs/demo/, docs/figures/) and README's claims table from it.
# The same command as `make demo` in a fresh directory; the demo is deterministic, so a second
# run writes byte-identical files.
demo-docs: install
	rm -rf runs/demo-docs
	$(VENV)/bin/steadystep demo --out runs/demo-docs
	$(PY) tools/demo_docs.py runs/demo-docs
	$(PY) tools/render_docs.py --only demo-claims

test: install-dev
	$(PY) -m pytest -q -p no:cacheprovider tests

# The benchmarks behind docs/performance.md, docs/alrc.md, docs/clean.md and docs/ladder.md (CPU;
# bench_clean.py takes ~30 minutes on 2 cores), then their tables.
bench: install-dev
	$(PY) benchmarks/bench_speed.py --out benchmarks/results
	$(PY) benchmarks/bench_step.py --out benchmarks/results
	$(PY) benchmarks/bench_alrc.py --out benchmarks/results
	$(PY) benchmarks/bench_first_step.py --out benchmarks/results
	$(PY) benchmarks/bench_alrc_early.py --out benchmarks/results
	$(PY) benchmarks/bench_clean.py --out benchmarks/results
	$(PY) benchmarks/bench_escalation.py --out benchmarks/results
	$(PY) tools/render_docs.py

# On a CUDA machine: the CUDA tests, bench_gpu.py and bench_step.py's GPU models (logs in
# runs/gpu/), then their tables.
bench-gpu: install-dev
	OUT=runs/gpu PY=$(PY) bash benchmarks/gpu_check.sh
	cp runs/gpu/gpu.json benchmarks/results/gpu.json
	test ! -f runs/gpu/step_gpu.json || cp runs/gpu/step_gpu.json benchmarks/results/step_gpu.json
	$(PY) tools/render_docs.py

# The documentation site (API reference from the docstrings) into build/site; warnings fail.
docs: install-dev
	$(PY) tools/render_docs.py --check
	$(VENV)/bin/mkdocs build --strict --site-dir build/site

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks examples tools
	$(VENV)/bin/ruff format --check src tests benchmarks examples tools

# Mutation testing of the core modules against their own tests (tools/mutation.py); not part of
# `make test`. Results: mutation-results/*.json; equivalent mutants: tools/mutation_equivalent.json.
MUTATION_JOBS ?= 1
MUTATION_FAIL_UNDER ?= 95
MUTATE := $(PY) tools/mutation.py --jobs $(MUTATION_JOBS)

mutation: install-dev
	$(MUTATE) --module src/steadystep/alrc.py --tests tests/test_alrc.py \
		--tests tests/test_alrc_distributed.py --out mutation-results/alrc.json
	$(MUTATE) --module src/steadystep/agnostic.py --tests tests/test_agnostic.py \
		--out mutation-results/agnostic.json
	$(MUTATE) --module src/steadystep/detectors/page_hinkley.py --tests tests/test_detect.py \
		--out mutation-results/detect.json
	$(MUTATE) --module src/steadystep/optim/cprop/_math.py --tests tests/test_cprop.py \
		--out mutation-results/cprop_math.json
	$(MUTATE) --module src/steadystep/optim/_alera_core.py --tests tests/test_alera.py \
		--tests tests/test_agadam.py --out mutation-results/alera_core.json
	$(MUTATE) --module src/steadystep/detectors/spike.py --tests tests/test_detectors.py \
		--out mutation-results/spike.json
	$(MUTATE) --module src/steadystep/guard.py --tests tests/test_guard.py \
		--tests tests/test_ladder.py --tests tests/test_escalation.py \
		--out mutation-results/guard.json
	$(PY) tools/mutation.py --fail-under $(MUTATION_FAIL_UNDER) --summary \
		mutation-results/alrc.json mutation-results/agnostic.json mutation-results/detect.json \
		mutation-results/cprop_math.json mutation-results/alera_core.json \
		mutation-results/spike.json mutation-results/guard.json

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info .pytest_cache .ruff_cache mutation-results

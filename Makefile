# The two commands of the README contract: `make demo` and `make test`.
# Both create .venv and install everything on a fresh machine (torch first, pinned: a
# looser spec would pull GBs of CUDA wheels).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedscan-installed
DEMO_ARGS ?=
BENCH_ARGS ?=
BENCHES := federated rounds compression inference telemetry

.PHONY: install demo test lint bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m fedscan demo $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy protocol learning coordinator edge_agent export fedscan bench

test: install lint
	$(PY) -m pytest -q tests
	$(MAKE) --no-print-directory bench-quick

bench-quick: install
	@for b in $(BENCHES); do \
	  if [ -f bench/$$b.py ]; then echo "== bench/$$b.py --quick"; $(PY) bench/$$b.py --quick || exit 1; fi; \
	done

bench: install
	@for b in $(BENCHES); do \
	  if [ -f bench/$$b.py ]; then echo "== bench/$$b.py"; $(PY) bench/$$b.py $(BENCH_ARGS) || exit 1; fi; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo-out

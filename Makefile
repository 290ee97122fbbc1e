# The two commands of the README contract: `make demo` and `make test`.
# Both create .venv and install everything on a fresh machine (torch first, pinned: a
# looser spec would pull GBs of CUDA wheels).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedscan-installed
DEMO_ARGS ?=
BENCH_ARGS ?=
BENCHES := federated rounds compression inference serve telemetry privacy robustness melanoma defaults defaults_subset segment segment_clip_robustness fuzz load async oneshot anomaly downlink

.PHONY: install system-deps demo test lint bench bench-quick clean

# Debian packages the tests use: mosquitto (a private broker per test), promtool (alert rules),
# chromium (dashboard test). Best effort: where they cannot be installed, those tests skip with
# the reason, and the demo falls back to the embedded broker.
SYSTEM_DEPS := mosquitto:mosquitto promtool:prometheus chromium:chromium

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

system-deps:
	@missing=""; for pair in $(SYSTEM_DEPS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) \
	      >/dev/null 2>&1 || echo "warning: could not install$$missing; the tests that need them will skip"; \
	  else echo "warning: missing$$missing (not root or no apt); the tests that need them will skip"; fi; \
	fi

demo: install
	$(PY) -m fedscan demo $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy protocol firmware learning coordinator edge_agent export fedscan bench

# The quick benchmarks run first and pytest last, so that the run ends with pytest's summary.
# pytest runs on two workers (pytest-xdist). Tried and dropped: the multi-process test modules first
# (xdist's load scheduler then queued all of them on one worker: 15 min instead of 13.7).
# A failed multi-process test is rerun once and listed as RERUN in the summary (tests/conftest.py).
# The multi-process tests and the quick benches start their Python processes through a fork server
# (tools/forkserver.py: torch and the other libraries imported once per pytest worker, not once per
# process); FEDSCAN_TEST_FORKSERVER=0 starts plain interpreters instead.
# The pip install and the Debian packages go side by side (both mostly wait on disk: about 5 minutes
# one after the other on a fresh machine).
test:
	@$(MAKE) --no-print-directory -j2 install system-deps
	@$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory bench-quick
	$(PY) -m pytest -q -rsR -n 2 tests

bench-quick: install
	@$(PY) tools/bench_quick.py $(BENCHES)

bench: install
	@for b in $(BENCHES); do \
	  if [ -f bench/$$b.py ]; then echo "== bench/$$b.py"; $(PY) bench/$$b.py $(BENCH_ARGS) || exit 1; fi; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo-out

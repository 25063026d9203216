# Two commands on a fresh clone:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV := .venv
BENCH_VENV := .venv-bench
PY := $(VENV)/bin/python
STORE ?= feature_store
ARTIFACTS ?= artifacts

.PHONY: demo test docs bench setup clean live

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-ray.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

$(STORE)/chaos_manifest.json: | $(VENV)/.installed
	$(PY) -m latency_forecast.synthetic --output $(STORE) --days 35 --seed 0

demo: $(VENV)/.installed $(STORE)/chaos_manifest.json
	$(PY) train.py --feature-store-path $(STORE) --output-dir $(ARTIFACTS)

# a demo store ending now, a model (make demo's when there is one), forecast.py every minute into
# $(LIVE_TEXTFILE_DIR) for node_exporter's textfile collector (docs/operations.md#the-live-demo-make-live)
LIVE_DIR ?= live
LIVE_TEXTFILE_DIR ?= $(LIVE_DIR)/textfile
live: $(VENV)/.installed
	$(PY) -m tools.live --directory $(LIVE_DIR) --textfile-directory $(LIVE_TEXTFILE_DIR) --model-dir $(ARTIFACTS)

test: $(VENV)/.installed
	$(PY) -m pytest -q

# docs/flags.md is generated from the scripts' parsers; tests/test_docs.py fails when it is stale
docs: $(VENV)/.installed
	$(PY) -m tools.flags_reference

# Benchmarks need Darts and Lightning: a venv of their own, so they never reach .venv
$(BENCH_VENV)/.installed: requirements.txt requirements-dev.txt requirements-ray.txt requirements-bench.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -r requirements-bench.txt
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python -m bench.run_all

clean:
	rm -rf $(ARTIFACTS) $(STORE)

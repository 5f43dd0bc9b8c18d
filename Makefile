# Post-gene-therapy safety monitor: developer entry points.
#   make demo   set up, start a local Apache Kafka broker and a worker, run a sample cohort, print a summary
#   make test   install what the tests need and run the whole suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
#: the latency benchmark's alert reader runs on kcat (bench/kcat_clients.py)
BENCH_DEBS := kcat
DEBS := prometheus prometheus-alertmanager chromium chromium-driver $(BENCH_DEBS)


.PHONY: demo-stop tools setup deps core debs kafka-fetch kafka kafka-stop kafka-reset worker demo test test-unit test-integration test-long bench schema clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,compiled]'
	touch $@

deps: $(VENV)/.installed

# the clinical core's hot modules compiled by Cython from their exact source (alerts/compiled_core.py);
# idempotent: only a module whose source changed is built again, or taken from the machine's cache
# of builds of the same source and recipe (CLINICAL_CORE_CACHE)
core: deps
	deploy/local/install-debs.sh gcc
	$(PY) scripts/build_clinical_core.py

debs:
	deploy/local/install-debs.sh $(DEBS)

kafka-fetch:
	deploy/local/kafka.sh fetch

setup: deps core kafka-fetch

kafka: deps kafka-fetch
	deploy/local/kafka.sh start

kafka-stop:
	deploy/local/kafka.sh stop

kafka-reset:
	deploy/local/kafka.sh reset

worker: kafka core  # needs PSEUDONYM_SECRET (32+ random characters; README "Security")
	$(VENV)/bin/monitor worker

schema: deps
	$(VENV)/bin/monitor schema --out schemas/json

demo: setup kafka
	$(PY) -m monitor.demo

demo-stop:
	$(PY) -m monitor.demo stop

tools:
	scripts/install-node-tools.sh
	deploy/local/install-tools.sh

# the suite on TEST_WORKERS pytest-xdist processes (0: in this one), each with its own broker
# and sent whole test modules in the order they are collected (a module's fixtures start once)
TEST_WORKERS ?= 2
test: setup debs tools
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# the long reliability mode: 20 SIGKILLs, broker restarts, 1,000,000 fuzzed inputs (about 1.5 h)
test-long: setup debs
	$(PY) tests/reliability/run_long.py --kills 20 --broker-restarts 3 --fuzz 1000000

test-unit: deps core
	$(PY) -m pytest -q -m "not integration" tests/unit

bench: setup kafka
	deploy/local/install-debs.sh $(BENCH_DEBS)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .kafka .pytest_cache *.egg-info .build

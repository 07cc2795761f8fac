# Routine actions. `make install` once, then `make test` / `make run`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast run bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $(STAMP)

test: install            ## the whole suite (unit, integration, acceptance runs)
	$(PY) -m pytest tests

test-fast: install       ## unit tests only
	$(PY) -m pytest tests/unit

run: install             ## the demo: SFT vs PSFT on the tiny model, locally
	$(VENV)/bin/posttrain demo --out .posttrain/demo

bench: install           ## throughput of the objectives on the tiny model (JSON lines)
	$(VENV)/bin/posttrain bench --size tiny --objectives sft,psft --json

clean:
	rm -rf .posttrain build *.egg-info

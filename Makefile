# foundry-dbrx: `make train` trains a tiny DBRX on the embedded corpus (and resumes it); `make test` runs the tests.
# Both create .venv from requirements/requirements.lock (with uv) when it is missing or stale.

PYTHON ?= python3
# The lock is resolved for this Python; uv finds it on the PATH (or pyenv) and builds .venv with it.
PY_VERSION := 3.11
VENV := .venv
PY := $(VENV)/bin/python
UV := .tools/bin/uv
STAMP := $(VENV)/.installed
DATA := data/default
PYTEST_ARGS ?=

.PHONY: all env train test lock clean prep-data

all: test

$(UV):
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target .tools uv==0.13.9

$(STAMP): requirements/requirements.lock setup.py foundry_dbrx/registry.py | $(UV)
	@echo "== creating $(VENV) from requirements/requirements.lock"
	@start=$$(date +%s); \
	$(UV) venv --quiet --allow-existing --python $(PY_VERSION) $(VENV) && \
	VIRTUAL_ENV=$(VENV) $(UV) pip sync --quiet requirements/requirements.lock && \
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet --no-deps -e . && \
	echo "== environment ready in $$(( $$(date +%s) - start )) s"
	@touch $(STAMP)

env: $(STAMP)

lock: | $(UV)
	$(UV) pip compile --quiet --python-version $(PY_VERSION) requirements/requirements.in -o requirements/requirements.lock

$(DATA)/train/index.json: | $(STAMP)
	$(VENV)/bin/foundry-dbrx prep-data --default --out $(DATA)

prep-data: $(DATA)/train/index.json

# make train: trains yamls/dbrx-tiny.yaml in runs/$(RUN_NAME). A rerun continues that run from its latest checkpoint
# (Ctrl-C saves one); FRESH=1 deletes its checkpoints first and starts over. Overrides: ARGS='max_duration=20ba ...',
# or as make variables (make train max_duration=20ba): every command-line variable that is not one of the
# Makefile's own is handed to the training as key=value.
RUN_NAME ?= dbrx-tiny
ARGS ?=
FRESH ?=
MAKEFILE_VARS := ARGS FRESH RUN_NAME PYTEST_ARGS PYTHON PY_VERSION VENV PY UV STAMP DATA
TRAIN_OVERRIDES := $(strip $(foreach v,$(filter-out $(MAKEFILE_VARS),$(.VARIABLES)),\
	$(if $(filter command line,$(origin $(v))),$(v)=$($(v)))))

train: $(STAMP) $(DATA)/train/index.json
	$(PY) -m foundry_dbrx.train $(strip $(if $(FRESH),--fresh) yamls/dbrx-tiny.yaml run_name=$(RUN_NAME) $(TRAIN_OVERRIDES) $(ARGS))

test: $(STAMP)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .tools runs data .pytest_cache

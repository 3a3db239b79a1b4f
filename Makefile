# Set-up and entry points. `make train` and `make test` create .venv when it is
# missing and install the pinned dependencies into it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ASSETS ?= ../shared/datasets/sdnet2018-decks
WORKSPACE ?= workspace
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test install install-test predict clean-venv serve deploy stop

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## Train on the images in ASSETS (one sub-folder per label); extra options in ARGS.
train: $(VENV)/.installed
	$(BIN)/crackjax train $(ASSETS) --workspace $(WORKSPACE) $(ARGS)

## Classify IMAGE (a file or folder) with the champion model of WORKSPACE.
predict: $(VENV)/.installed
	$(BIN)/crackjax predict $(IMAGE) --workspace $(WORKSPACE) $(ARGS)

## Run the test suite.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# Local Prefect service (see docs/deployment.md). The server listens on 127.0.0.1:PREFECT_PORT;
# pid files, logs and the default PREFECT_HOME (SQLite database) are under .prefect-local/.
PREFECT_PORT ?= 4200
SERVICE := PREFECT_BIN=$(BIN)/prefect PREFECT_PORT=$(PREFECT_PORT) flows/local_service.sh

## Start a Prefect server and a process worker in the background and deploy prefect.yaml.
serve: $(VENV)/.installed
	$(SERVICE) serve

## Deploy prefect.yaml again to the running server (after editing it).
deploy: $(VENV)/.installed
	$(SERVICE) deploy

## Stop the worker and the server that `make serve` started.
stop:
	$(SERVICE) stop

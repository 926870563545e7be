# `make test` and `make run` both work from a fresh clone: they build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromedriver
APT := $(if $(filter 0,$(shell id -u)),,sudo) apt-get

.PHONY: venv test lint run models imagenet-models clean

$(FMNIST):
	@command -v apt-get >/dev/null || { echo "need Debian's dataset-fashion-mnist package"; exit 1; }
	$(APT) install -y dataset-fashion-mnist || { $(APT) update && $(APT) install -y dataset-fashion-mnist; }

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly pinned, so nothing later resolves a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The leaderboard test renders the page in Debian's headless Chromium.
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "need Debian's chromium and chromium-driver packages"; exit 1; }
	$(APT) install -y chromium chromium-driver || { $(APT) update && $(APT) install -y chromium chromium-driver; }

venv: $(STAMP) $(FMNIST)

# ruff: lint rules and the formatter's check, both configured in pyproject.toml.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: venv $(CHROMIUM)
	$(PY) -m pytest -q

# The whole service on this machine: API + a Celery worker, SQLite database and broker under ./var.
run: venv
	$(PY) -m api.local --host $(or $(HOST),127.0.0.1) --port $(or $(PORT),8000)

models: venv
	$(PY) models/train.py

# ResNet-18 and MobileNetV2 at 224 px with their Fashion-MNIST-derived data set (models/build_imagenet.py says
# how the weights are made); the files are large and not committed, this rebuilds them reproducibly.
imagenet-models: venv
	$(PY) models/build_imagenet.py

clean:
	rm -rf $(VENV) build *.egg-info

# `make test` and `make run` both work from a fresh clone: they build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: venv test run models clean

$(FMNIST):
	@command -v apt-get >/dev/null || { echo "need Debian's dataset-fashion-mnist package"; exit 1; }
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y dataset-fashion-mnist || \
	  { $(if $(filter 0,$(shell id -u)),,sudo) apt-get update && $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y dataset-fashion-mnist; }

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly pinned, so nothing later resolves a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP) $(FMNIST)

test: venv
	$(PY) -m pytest -q

run: venv
	$(VENV)/bin/bitsearch inspect models/resnet20-fmnist.pt2
	$(VENV)/bin/bitsearch eval models/resnet20-fmnist.pt2 --data fashion-mnist --uniform 8/8
	$(VENV)/bin/bitsearch eval models/resnet20-fmnist.pt2 --data fashion-mnist --uniform 4/8

models: venv
	$(PY) models/train.py

clean:
	rm -rf $(VENV) build *.egg-info

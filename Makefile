# The two commands the README opens with: `make demo` and `make test`.
# Both create .venv, install the package with the pinned torch (constraints.txt) and get the data.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test data install lint clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST: already found (MINIDIFFUSION_DATA, Debian's package, the cache), else Debian's
# package when we may use apt-get, else a verified download into the user cache.
data: $(STAMP)
	@$(PY) -c "from minidiffusion.data.fashion_mnist import find_fashion_mnist as f; print('data:', f())" 2>/dev/null \
	|| { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	     && { apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
	          || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; }; } \
	|| $(PY) -m minidiffusion data fashion-mnist

# The main job: train the default class-conditional preset for a bounded time on CPU, then sample a
# labelled grid (one row per class) and a denoising progression with a fast sampler, into runs/demo/.
DEMO_MINUTES ?= 7
demo: data
	$(PY) -m minidiffusion train fmnist --out runs/demo --replace minutes=$(DEMO_MINUTES)
	$(PY) -m minidiffusion sample runs/demo --n 100 --sampler dpmpp_2m --steps 20 --out runs/demo/grid.png

test: data
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

clean-venv:
	rm -rf $(VENV)

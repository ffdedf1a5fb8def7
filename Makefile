# The two commands the README opens with: `make demo` and `make test`.
# Both create .venv, install the package with the pinned torch (constraints.txt) and get the data.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test data system-packages install lint clean-venv

# Debian packages the data comes from (docs/data.md): Fashion-MNIST, the emoji font and list, photographs,
# and the General MIDI sound font with its synthesizer (instrument notes; installed together, or
# libfluidsynth3 pulls in another font); the Wesnoth unit sprites (the colour classifier of super-resolution);
# and Chromium with its WebDriver, for the web page's browser test.
DEBIAN_PACKAGES := dataset-fashion-mnist fonts-noto-color-emoji unicode-data plasma-workspace-wallpapers mate-backgrounds \
	fluid-soundfont-gm libfluidsynth3 wesnoth-1.16-data chromium chromium-driver

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Install the missing Debian packages when we may (root with apt-get); otherwise say which are missing.
system-packages:
	@missing="$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done)"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -qq $$missing >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $$missing; }; \
	  else echo "missing Debian packages (install them: sudo apt-get install $$missing)"; fi; \
	fi

# Fashion-MNIST: already found (MINIDIFFUSION_DATA, Debian's package, the cache), else Debian's
# package when we may use apt-get, else a verified download into the user cache.
data: $(STAMP) system-packages
	@$(PY) -c "from minidiffusion.data.fashion_mnist import find_fashion_mnist as f; print('data:', f())" 2>/dev/null \
	|| { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	     && { apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
	          || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; }; } \
	|| $(PY) -m minidiffusion data fashion-mnist

# The main job: train the default class-conditional preset for a bounded time on CPU, then sample a
# labelled grid (one row per class) and a denoising progression with a fast sampler, into runs/demo/;
# then the Stable Diffusion path in seconds: a prompt grid from the shipped text-to-image pipeline.
DEMO_MINUTES ?= 7
demo: data
	$(PY) -m minidiffusion train fmnist --out runs/demo --replace minutes=$(DEMO_MINUTES)
	$(PY) -m minidiffusion sample runs/demo --n 100 --sampler dpmpp_2m --steps 20 --out runs/demo/grid.png
	$(PY) -m minidiffusion sample --pretrained emoji --prompt "an emoji of red heart" --guidance 4 --n 8 \
	    --steps 20 --out runs/demo/prompt.png

test: data
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

clean-venv:
	rm -rf $(VENV)

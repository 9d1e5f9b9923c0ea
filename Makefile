# Two commands a new user needs: `make demo` (the main job end to end) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cctl-installed

.PHONY: install demo test test-fast reliability clean

$(STAMP): requirements/cpu.txt setup.cfg
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/cpu.txt
	$(BIN)/python -m pip install -q --no-deps torchrec==1.8.0
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/cctl-rec doctor
	touch $(STAMP)

install: $(STAMP)

# Generates the small synthetic two-domain data, trains CCTL on 2 CPU ranks through torchx,
# prints the result table.
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

# Everything: unit, 2-rank gloo, and end to end through torchx (torchx needs the venv's bin on PATH).
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

# Unit tests only: no process started, none over ~5 s (tests marked `slow` or `dist` left out);
# under 2 minutes on one core (docs/testing.md).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Issue #8's bad-input, fault and security cases (tests marked `reliability`, torchx ones included),
# then docs/reliability.md from their outcomes.
RELIABILITY_JSON := runs/reliability.json
reliability: $(STAMP)
	CCTL_RELIABILITY_OUT=$(RELIABILITY_JSON) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m reliability || true
	$(BIN)/python scripts/reliability_report.py $(RELIABILITY_JSON) docs/reliability.md

clean:
	rm -rf runs data

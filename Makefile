# The two commands the README opens with. Both create .venv on first use:
# CPU torch first (else pip pulls the multi-GB CUDA build), then the project.
VENV ?= .venv
PY := $(VENV)/bin/python
SWEEP ?= sweeps/demo.yaml

.PHONY: install demo test clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/clmscale demo $(SWEEP)

test: install
	$(VENV)/bin/pytest -q

clean-demo:
	rm -rf runs/demo

# Convenience targets; the README gives the same commands without make.
PY ?= python3
VENV := .venv

$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	touch $@

.PHONY: demo test clean
demo: $(VENV)/.installed
	$(VENV)/bin/python demo.py $(if $(CORPUS),--corpus $(CORPUS))

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache

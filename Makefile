VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: install
	$(PY) example_experiment.py --preset demo --run --plot

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: install
	$(PY) -m pip install -q --no-deps -r requirements-bench.txt
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf checkpoint bash_scripts

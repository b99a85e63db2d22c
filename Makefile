# The README's two commands: `make demo` and `make test`. Both create .venv and
# install the project into it first, so they work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint lab bench clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { echo "Creating a virtual environment failed: install Python's venv module (Debian: apt-get install python3-venv) and run make again."; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

demo: $(VENV)/.installed
	$(PY) -m pacsframe.cli demo

# Parallel workers (pytest-xdist), one test file per worker at a time: a file's
# servers, cohorts and notebook kernel stay in one process. Three, even on two
# cores: much of the suite waits on sockets, child processes and timeouts.
# PYTEST_WORKERS=0 runs everything in this process.
PYTEST_WORKERS ?= 3
PYTEST_ARGS ?= -n $(PYTEST_WORKERS) --dist loadfile

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

# Side-by-side timings against raw pynetdicom and dcmtk on a local Orthanc (several
# minutes; the first run also loads the cohorts into benchmarks/.work/). Needs the
# Debian packages orthanc and dcmtk; installs nothing. Not part of `make test`.
bench: $(VENV)/.installed
	$(PY) benchmarks/run.py --results benchmarks/RESULTS.md

lab: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet -e '.[lab]' && $(VENV)/bin/jupyter lab notebooks/

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

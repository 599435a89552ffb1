# Set-up and entry points. `make demo` and `make test` create .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BACKENDS := tensorflow jax torch
# pytest-xdist workers per backend run (the CI machine has 2 cores).
WORKERS ?= 2

.PHONY: install demo test test-tensorflow test-jax test-torch docs bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The exact CPU build of PyTorch the suite is checked with; the `torch` extra itself
	# only gives a floor.
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	KERAS_BACKEND=$${KERAS_BACKEND:-jax} $(VENV)/bin/dl-moe demo

# One pytest run per backend; fails if any run fails, after running all three.
test: $(STAMP)
	@failed=""; \
	for backend in $(BACKENDS); do \
		echo "=== KERAS_BACKEND=$$backend"; \
		KERAS_BACKEND=$$backend $(PY) -m pytest -q -n $(WORKERS) tests || failed="$$failed $$backend"; \
	done; \
	if [ -n "$$failed" ]; then echo "FAILED backends:$$failed"; exit 1; fi; \
	echo "All backends passed."

test-%: $(STAMP)
	KERAS_BACKEND=$* $(PY) -m pytest -q -n $(WORKERS) tests

# The documentation site (site/); warnings are errors.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) build dist site *.egg-info outputs

# `make run` starts the app, `make test` runs the suite. Both create .venv from requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
SERVE_STAMP := $(VENV)/.installed-serve
ARGS ?=

.PHONY: run test venv serve-deps clean-venv browser

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	cp requirements.txt $(STAMP)

# Ray Serve, for --replicas: optional for `make run`, always there for `make test`.
serve-deps: $(SERVE_STAMP)

$(SERVE_STAMP): $(STAMP) requirements-serve.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-serve.txt
	cp requirements-serve.txt $(SERVE_STAMP)

run: $(STAMP)
	$(PY) app.py $(ARGS)

# The browser test drives Debian's chromium; install it when missing and we may (root with apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
		echo "chromium not installed: the browser test will be skipped"

test: $(STAMP) $(SERVE_STAMP) browser
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)

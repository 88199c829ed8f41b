# The README's quick start: `make demo`, `make test`. Both set up .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install browser strace clip-front test test-fast demo lint clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes; a second `make install` is instant.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# A Debian tool a test needs: installed with apt-get as root, else the test skips (saying so).
# $(call debian_tool,COMMAND,PACKAGE,WHICH TEST)
define debian_tool
	@command -v $(1) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's $(2) for $(3)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
	  else \
	    echo "note: $(1) is missing and cannot be installed here (needs root and apt-get): $(3) will skip"; \
	  fi; }
endef

# The browser test drives Debian's Chromium through Playwright (Playwright never downloads a browser here).
browser:
	$(call debian_tool,chromium,chromium,the browser test)

# The local-disk test watches an S3 pipeline's file writes with Debian's strace.
strace:
	$(call debian_tool,strace,strace,the local-disk test)

# clip-retrieval 2.45's web front and its ClipClient, unpacked from its wheel (never installed: its
# pins clash with ours) for the compatibility tests; they skip, saying so, when it cannot be fetched.
CLIP_RETRIEVAL := .cache/clip-retrieval
CLIP_WHEEL     := clip_retrieval-2.45.0-py3-none-any.whl

clip-front: install
	@test -f $(CLIP_RETRIEVAL)/front/build/index.html || { \
	  rm -rf $(CLIP_RETRIEVAL) && mkdir -p $(CLIP_RETRIEVAL) && \
	  $(PY) -m pip download --quiet --no-deps clip-retrieval==2.45.0 -d $(CLIP_RETRIEVAL) && \
	  $(PY) -m zipfile -e $(CLIP_RETRIEVAL)/$(CLIP_WHEEL) $(CLIP_RETRIEVAL) && \
	  echo "clip-retrieval's front and client unpacked in $(CLIP_RETRIEVAL)"; \
	} || echo "note: clip-retrieval 2.45 could not be downloaded: its front and client tests will skip"

# Two workers, each with its own Ray and session fixtures; a test file stays on one worker (its
# module fixtures are built once, and the demo's fixed port is used by one file only), and the files
# go out in conftest's order (the longest first), not xdist's (the most tests first).
TEST_WORKERS ?= 2
PYTEST       := $(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Everything: tests/unit and tests/integration (Ray, moto's S3, subprocesses, Chromium).
test: install browser strace clip-front
	$(PYTEST) --durations=15

# tests/unit only: no Ray, no S3 server, no subprocess, no browser (under 90 s).
test-fast: install
	$(PYTEST) tests/unit

demo: install
	$(VENV)/bin/rayclip demo

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf data test-artifacts .pytest_cache .cache

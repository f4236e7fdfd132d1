# The two commands of the README: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,sparkplug]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mes-hub demo

lint: $(STAMP)
	$(BIN)/ruff check contracts hub adapters projections audit tests bench
	$(BIN)/ruff format --check contracts hub adapters projections audit tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# Two workers, each taking whole files (a file's fixtures stay on one worker): most of the suite
# waits on real servers, so two at once halve its time on a 2-core machine (19.7 → 11 min).
test: lint typecheck browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Debian's chromium for tests/browser (Playwright never downloads a browser here): installed
# when missing and we can (root, apt-get), quietly; otherwise, or if apt fails, the build goes on
# and those tests skip, naming why. MES_HUB_CHROMIUM names another browser instead.
DEBIAN_CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -n "$$MES_HUB_CHROMIUM" ] || [ -x "$(DEBIAN_CHROMIUM)" ] || \
	  command -v chromium >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "no $(DEBIAN_CHROMIUM), and apt-get needs root: the browser tests will skip"; exit 0; fi; \
	echo "installing Debian's chromium for the browser tests (apt-get)"; \
	log=$$(mktemp); export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -qq --no-install-recommends chromium >"$$log" 2>&1 || \
	{ apt-get update -qq >>"$$log" 2>&1 && \
	  apt-get install -y -qq --no-install-recommends chromium >>"$$log" 2>&1; } || \
	{ tail -n 5 "$$log"; echo "could not install chromium: the browser tests will skip"; }; \
	rm -f "$$log"

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/ingest_stages.py
	$(BIN)/python bench/projections.py
	$(BIN)/python bench/adapters.py
	$(BIN)/python bench/api_load.py
	$(BIN)/python bench/erp.py
	$(BIN)/python bench/webhooks.py
	$(BIN)/python bench/ui.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info

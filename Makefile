# Every target sets itself up: a .venv with Python >= 3.12 and the dev dependencies.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# npm dev tools (axe-core for the page's accessibility tests), exactly as package-lock.json pins.
NODE_STAMP := node_modules/.installed
# The Vercel CLI (tools/vercel-cli/package-lock.json) and uv, pinned, for `make vercel-dev` and the
# tests that run `vercel build` and `vercel dev`; uv is the version @vercel/python 25 itself installs.
VERCEL_TOOLS := tools/vercel-cli
VERCEL := $(VERCEL_TOOLS)/node_modules/.bin/vercel
UV_VERSION := 0.10.11
VERCEL_STAMP := $(VERCEL_TOOLS)/.installed

.PHONY: dev test check bench fmt clean openapi vercel-cli vercel-dev

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 12))' || \
		{ echo "Python >= 3.12 is required (found $$($(PYTHON) --version)); set PYTHON=/path/to/python3.12"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); \
		print("\n".join(p["project"]["dependencies"] + p["dependency-groups"]["dev"]))' > $(VENV)/requirements.lock.in
	$(BIN)/python -m pip install --quiet -r $(VENV)/requirements.lock.in
	@touch $(STAMP)

$(NODE_STAMP): package.json package-lock.json
	@command -v npm >/dev/null || { echo "npm is required for the page's accessibility tests (apt-get install -y npm)"; exit 1; }
	npm ci --no-audit --no-fund --loglevel=error
	@touch $(NODE_STAMP)

$(VERCEL_STAMP): $(VERCEL_TOOLS)/package.json $(VERCEL_TOOLS)/package-lock.json $(STAMP)
	@command -v npm >/dev/null || { echo "npm is required for the Vercel CLI (apt-get install -y npm)"; exit 1; }
	@# npm ci refuses this lock: vercel 64.0.2 names optional native packages npm does not serve.
	npm install --prefix $(VERCEL_TOOLS) --no-save --no-audit --no-fund --loglevel=error
	$(BIN)/python -m pip install --quiet --upgrade --target $(VERCEL_TOOLS)/python uv==$(UV_VERSION)
	@touch $(VERCEL_STAMP)

dev: $(STAMP)
	$(BIN)/python -m tools.devhost $(ARGS)

vercel-cli: $(VERCEL_STAMP)

# vercel dev with vercel.json minus maxDuration, which CLI 64 rejects (vercel/vercel#17620).
vercel-dev: $(STAMP) $(VERCEL_STAMP)
	$(BIN)/python -m tools.vercel_dev
	PATH="$(CURDIR)/$(VERCEL_TOOLS)/python/bin:$$PATH" $(VERCEL) dev --local-config .vercel/vercel.dev.json $(ARGS)

# The suite waits on real processes more than it computes, so it runs on more workers than
# cores (pytest-xdist; a module's tests stay together, on one worker, with its hosts).
# TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 4
test: $(STAMP) $(NODE_STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

check: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy api lib

openapi: $(STAMP)
	$(BIN)/python -m tools.openapi

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache node_modules .artifacts \
		$(VERCEL_TOOLS)/node_modules $(VERCEL_TOOLS)/python $(VERCEL_STAMP)

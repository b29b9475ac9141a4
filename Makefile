# Everything a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DB := demo.db
DEMO_URL := sqlite+aiosqlite:///./$(DEMO_DB)
# last night's batch, as the demo writes and ingests it (twice): try `pipeline-console ingest` on it
DEMO_BATCH := demo-last-night.ndjson
# The demo's own secret key (encrypts its systems' secrets), made on the first run and kept
# out of git. Production sets PIPELINE_CONSOLE_SECRET_KEY itself (docs/connecting.md).
DEMO_KEY := .demo-secret-key
DEMO_ENV = PIPELINE_CONSOLE_DATABASE_URL=$(DEMO_URL) PIPELINE_CONSOLE_SECRET_KEY="$$(cat $(DEMO_KEY))"

.PHONY: demo test lint bench clean

$(BIN)/pipeline-console: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(DEMO_KEY): | $(BIN)/pipeline-console
	umask 077 && $(BIN)/pipeline-console secrets new-key | tail -n 1 > $@.tmp && mv $@.tmp $@

demo: $(BIN)/pipeline-console $(DEMO_KEY)
	rm -f $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm $(DEMO_BATCH)
	$(DEMO_ENV) $(BIN)/pipeline-console migrate
	$(DEMO_ENV) $(BIN)/pipeline-console demo --batch-file $(DEMO_BATCH)
	$(DEMO_ENV) $(BIN)/pipeline-console serve --host 127.0.0.1 --port 8000

test: $(BIN)/pipeline-console
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -n 2 $(PYTEST_ARGS)

bench: $(BIN)/pipeline-console
	$(BIN)/python -m bench.run

lint: $(BIN)/pipeline-console
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm $(DEMO_BATCH) $(DEMO_KEY) .pytest_cache

# Everything a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DB := demo.db
DEMO_URL := sqlite+aiosqlite:///./$(DEMO_DB)

.PHONY: demo test lint bench clean

$(BIN)/pipeline-console: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/pipeline-console
	rm -f $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm
	PIPELINE_CONSOLE_DATABASE_URL=$(DEMO_URL) $(BIN)/pipeline-console migrate
	PIPELINE_CONSOLE_DATABASE_URL=$(DEMO_URL) $(BIN)/pipeline-console demo
	PIPELINE_CONSOLE_DATABASE_URL=$(DEMO_URL) $(BIN)/pipeline-console serve --host 127.0.0.1 --port 8000

test: $(BIN)/pipeline-console
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -n 2 $(PYTEST_ARGS)

bench: $(BIN)/pipeline-console
	$(BIN)/python -m bench.run

lint: $(BIN)/pipeline-console
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm .pytest_cache

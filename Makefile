# One entry point for the checks CI runs (`make lint` is `.ci/run lint`; `make test` the README's test command).
# Run inside the environment where `pip install -e ".[test]"` installed pvfast.
PY ?= python3

.PHONY: install lint format test check

install:
	$(PY) -m pip install -e ".[test]"

lint:
	PY=$(PY) .ci/run lint

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
	cargo fmt --all

test:
	cargo test -p pvfast-core --release
	$(PY) -m pytest

check: lint test

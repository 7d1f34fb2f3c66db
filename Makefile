# One entry point for the checks CI runs (.ci/run calls `make lint` and the README's test command).
# Run inside the environment where `pip install -e ".[test]"` installed pvfast.
PY ?= python3

.PHONY: install lint lint-python lint-rust format test check

install:
	$(PY) -m pip install -e ".[test]"

lint: lint-python lint-rust

lint-python:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m mypy.stubtest pvfast._native

lint-rust:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
	cargo fmt --all

test:
	cargo test -p pvfast-core --release
	$(PY) -m pytest

check: lint test

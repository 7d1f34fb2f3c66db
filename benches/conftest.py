"""Shared by the benches: lines each bench wants shown after the run (ratios to their floors)."""

from __future__ import annotations

import pytest

BENCH_REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if BENCH_REPORT:
        terminalreporter.section("pvfast benchmark ratios")
        for line in BENCH_REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def bench_report() -> list[str]:
    """Append a line to have it printed in the terminal summary."""
    return BENCH_REPORT

"""docs/OUTPUT.md explains every JSON field and every CSV column the commands print.

Each command runs for real (small guests); every field of its JSON document must be listed in
the section of its record (a reboot result, a thread row, ...), and the CSV header must be the
documented column list, in order. A field added without a line in docs/OUTPUT.md fails here.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pvfast import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "OUTPUT.md"
SMALL = ["--memory", "3G", "--secure", "64M"]

# Where a record of one kind holds records of another (paths as in the doc: a.b, a[]).
NESTED: dict[str, dict[str, str]] = {
    "reboot": {
        "accounting.teardown[]": "thread row",
        "accounting.boot_new_guest[]": "thread row",
        "memory_timeline.events[]": "memory sample",
        "memory_timeline.samples[]": "memory sample",
    },
    "reboot --repeat": {"runs[]": "reboot"},
    "shutdown": {
        "vmm_exit.accounting[]": "thread row",
        "helper_exit.accounting[]": "thread row",
        "memory_timeline.events[]": "memory sample",
        "memory_timeline.samples[]": "memory sample",
        "runs[]": "shutdown",
    },
    "compare": {"rows[].sync": "reboot", "rows[].async": "reboot"},
}


def sections() -> dict[str, dict[str, str]]:
    """Per ``###`` section of docs/OUTPUT.md: documented field -> its meaning."""
    out: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("### "):
            current = out.setdefault(line[4:].strip(), {})
        elif line.startswith("## "):
            current = None
        elif current is not None:
            match = re.match(r"^\| `([^`]+)` \| (.*) \|$", line)
            if match:
                current[match.group(1)] = match.group(2)
    return out


DOCS = sections()
PROVENANCE = DOCS["Provenance (every document)"]


def leaves(doc: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every path to a value; a list of objects adds ``[]`` to its key, a list of scalars is a leaf."""
    if isinstance(doc, dict) and doc:
        for key, value in doc.items():
            yield from leaves(value, (*path, key))
    elif isinstance(doc, list) and doc and isinstance(doc[0], dict):
        for item in doc:
            yield from leaves(item, (*path[:-1], path[-1] + "[]"))
    else:
        yield path


def matches(pattern: str, path: tuple[str, ...]) -> bool:
    parts = pattern.split(".")
    return len(parts) == len(path) and all(p in ("*", q) for p, q in zip(parts, path, strict=True))


def undocumented(doc: dict[str, Any], record: str) -> list[str]:
    """The fields of ``doc`` (a record of kind ``record``) that docs/OUTPUT.md does not list."""
    fields = {**PROVENANCE, **DOCS[record]}
    maps = [tuple(f.split(".")) for f, meaning in fields.items() if meaning.startswith("*map*")]
    nested = NESTED.get(record, {})
    missing: list[str] = []
    for path in leaves(doc):
        for where in nested:
            prefix = tuple(where.split("."))
            if path[: len(prefix)] == prefix:
                break
        else:
            if any(path[: len(m)] == m for m in maps):
                continue  # inside a map: its keys are data
            if not any(matches(f, path) for f in fields):
                missing.append(f"{record}: {'.'.join(path)}")
    for where, kind in nested.items():
        for item in pick(doc, where.split(".")):
            missing += undocumented(item, kind)
    return missing


def pick(doc: Any, parts: list[str]) -> Iterator[dict[str, Any]]:
    """The records at ``parts`` (``a[]`` iterates) below ``doc``."""
    if not parts:
        if isinstance(doc, dict):
            yield doc
        return
    head, rest = parts[0], parts[1:]
    key, many = (head[:-2], True) if head.endswith("[]") else (head, False)
    if not isinstance(doc, dict) or doc.get(key) is None:
        return
    for item in doc[key] if many else [doc[key]]:
        yield from pick(item, rest)


def run_json(*argv: str, code: int = 0) -> dict[str, Any]:
    out, err = io.StringIO(), io.StringIO()
    assert cli.main([*argv, "--json"], out=out, err=err) == code, err.getvalue()
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("output")
    return [
        ("info", run_json("info")),
        ("reboot", run_json("reboot", *SMALL, "--plot", str(tmp / "r.png"))),
        ("reboot", run_json("reboot", "--memory", "2G", "--secure", "0", "--async")),  # fallback
        ("reboot", run_json("reboot", *SMALL, "--async", "--async-destroy", "0", code=1)),  # error
        ("reboot --repeat", run_json("reboot", *SMALL, "--repeat", "2", "--sync")),
        ("shutdown", run_json("shutdown", *SMALL)),
        ("shutdown", run_json("shutdown", *SMALL, "--no-helper", "--no-destroy-fast")),
        ("compare", run_json("compare", "--secure", "16M,32M", "--repeat", "2", "--plot", str(tmp / "c.png"))),
        ("calibrate", run_json("calibrate", "--measure", "disable:8G=3.2", "-o", str(tmp / "costs.toml"))),
    ]


def test_every_json_field_is_documented(documents):
    missing = [m for record, doc in documents for m in undocumented(doc, record)]
    assert sorted(set(missing)) == []


def test_the_checker_catches_an_undocumented_field(documents):
    record, doc = documents[1]
    assert undocumented({**doc, "surprise": 1}, record) == ["reboot: surprise"]
    assert undocumented({**doc, "memory_timeline": {"events": [{"extra": 0}]}}, record) == ["memory sample: extra"]


def test_every_record_section_exists():
    assert set(NESTED) | {v for m in NESTED.values() for v in m.values()} <= set(DOCS)
    for section in ("info", "calibrate", "Columns of every command"):
        assert DOCS[section]


@pytest.mark.parametrize("command", ["reboot", "shutdown", "compare"])
def test_csv_columns_are_the_documented_ones(command: str):
    documented = list(DOCS["Columns of every command"]) + list(DOCS[f"{command} columns"])
    assert cli.CSV_COLUMNS[command] == documented
    argv = {"reboot": [*SMALL], "shutdown": [*SMALL, "--helper"], "compare": ["--secure", "16M", "--no-plot"]}
    out, err = io.StringIO(), io.StringIO()
    assert cli.main([command, *argv[command], "--csv"], out=out, err=err) == 0, err.getvalue()
    header, *rows = out.getvalue().splitlines()
    assert header.split(",") == documented
    assert len(rows) == 1

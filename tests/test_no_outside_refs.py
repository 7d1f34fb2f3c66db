"""The repository stands alone: nothing in it points at a file a user of the package does not have.

pvfast was written against a behavioural description of the kernel and a contract that are not
shipped. Docs, docstrings and comments must say what they need in their own words, citing the
kernel function and the commit it was read at (``kvm_s390_pv_set_aside, arch/s390/kvm/pv.c @
f7866f582b1c``), never "spec §3.8" or ``../shared/...``. This test scans docs/, python/, rust/,
examples/, tests/, benches/, fuzz/ and the README and fails on:

* a path outside the repository (``../shared/``, ``shared/spec``, ``/work/``) or the name of an
  unshipped document (``kernel-pv-teardown``, ``userspace-protocol``, ``API.md``, ``STYLE.md``
  unless the repository has such a file);
* the word "spec" (the unshipped behavioural spec);
* a section sign ``§`` that does not name a heading of this repository: in a Markdown file ``§N``
  must be one of its own numbered headings, anywhere ``FILE.md §N`` must be a numbered heading of
  that file.

``ALLOWLIST`` names the files still waiting for their sweep (each a file, so it can be emptied
one by one); an entry that has nothing left to report fails too, so the list only shrinks.

Public names without a docstring are tests/test_public_surface.py's job (not repeated here).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("docs", "python", "rust", "examples", "tests", "benches", "fuzz")
SCANNED_FILES = ("README.md",)
SUFFIXES = {".md", ".py", ".pyi", ".rs", ".toml", ".txt", ".cfg"}
SKIPPED_PARTS = {"target", ".venv", "__pycache__", "corpus", ".hypothesis", "node_modules"}

# Files another branch is still editing; the lead sweeps them after that merge and removes the
# entry. Each entry must still have something to report (see test_allowlist_is_not_stale).
ALLOWLIST: frozenset[str] = frozenset()

OUTSIDE = [
    (re.compile(r"\.\./shared\b|\bshared/(?:spec|API\.md|STYLE\.md)|/work/"), "a path outside the repository"),
    (re.compile(r"kernel-pv-teardown|userspace-protocol"), "an unshipped document"),
    (re.compile(r"\bspec\b", re.IGNORECASE), 'the unshipped "spec"'),
]
DOC_NAMES = re.compile(r"\b(API|STYLE)\.md\b")
SECTION = re.compile(r"(?:([\w./-]+\.md)\s*)?§\s*(\d+(?:\.\d+)*[a-z]?)?")
HEADING = re.compile(r"^#+\s+(\d+(?:\.\d+)*[a-z]?)[.\s]")


def scanned_files() -> list[Path]:
    """The files the scan reads (this test's own file names the patterns, so it is left out)."""
    files = [ROOT / name for name in SCANNED_FILES if (ROOT / name).is_file()]
    for top in SCANNED_DIRS:
        files.extend(
            path
            for path in sorted((ROOT / top).rglob("*"))
            if path.is_file()
            and path.suffix in SUFFIXES
            and not SKIPPED_PARTS & set(path.parts)
            and path != Path(__file__).resolve()
        )
    return files


@cache
def headings(path: Path) -> frozenset[str]:
    """The section numbers of a Markdown file's headings (``## 3b. ...`` → ``3b``)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return frozenset()
    return frozenset(m.group(1) for line in lines if (m := HEADING.match(line)))


def resolve_doc(name: str, source: Path) -> Path | None:
    """A Markdown file a reference names: relative to the referring file, to docs/ or to the root."""
    for base in (source.parent, ROOT / "docs", ROOT):
        candidate = (base / name).resolve()
        if candidate.is_file() and ROOT in candidate.parents:
            return candidate
    return None


@cache
def shipped_doc_names() -> frozenset[str]:
    return frozenset(p.name for p in ROOT.rglob("*.md") if not SKIPPED_PARTS & set(p.parts))


def findings(path: Path) -> list[str]:
    """Every reference to something outside the repository in ``path``, as ``file:line: why``."""
    rel = path.relative_to(ROOT).as_posix() if ROOT in path.parents else path.name
    out: list[str] = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{rel}:{number}"
        for pattern, why in OUTSIDE:
            out.extend(f"{where}: {why}: {m.group(0)!r}" for m in pattern.finditer(line))
        out.extend(
            f"{where}: an unshipped document: {m.group(0)!r}"
            for m in DOC_NAMES.finditer(line)
            if m.group(0) not in shipped_doc_names()
        )
        for m in SECTION.finditer(line):
            doc_name, section = m.group(1), m.group(2)
            own = path if path.suffix == ".md" else None  # a bare § names a heading of this very file
            target = resolve_doc(doc_name, path) if doc_name else own
            if target is None or section is None or section not in headings(target):
                out.append(f"{where}: a section that is not a heading of this repository: {m.group(0)!r}")
    return out


def test_no_reference_outside_the_repository():
    found = [
        f for path in scanned_files() if path.relative_to(ROOT).as_posix() not in ALLOWLIST for f in findings(path)
    ]
    assert found == []


def test_allowlist_is_not_stale():
    """Every allowlisted file exists and still has a reference to sweep: a swept file leaves the list."""
    stale = [name for name in sorted(ALLOWLIST) if not (ROOT / name).is_file() or not findings(ROOT / name)]
    assert stale == []


def test_the_scan_covers_what_users_read():
    names = {p.relative_to(ROOT).as_posix() for p in scanned_files()}
    for expected in ("README.md", "docs/OUTPUT.md", "docs/VERIFICATION.md", "python/pvfast/cli.py"):
        assert expected in names
    assert any(name.startswith("rust/pvfast-core/src/") and name.endswith(".rs") for name in names)


@pytest.mark.parametrize(
    ("line", "flagged"),
    [
        ("see ../shared/spec/kernel-pv-teardown.md", True),
        ("the spec says so", True),
        ("Spec references (§) are to ...", True),
        ("(spec §3.8 g)", True),
        ("/// Condition code (spec §1.2).", True),
        ("API.md says injections change nothing", True),
        ("see §4 below", False),  # a heading of the probe file
        ("see §4.1 below", True),  # no such heading
        ("docs/VERIFICATION.md §5", False),
        ("docs/VERIFICATION.md §42", True),
        ("a specification exception", False),
        ("kvm_s390_pv_set_aside, arch/s390/kvm/pv.c @ f7866f582b1c", False),
    ],
)
def test_the_rules(tmp_path: Path, line: str, flagged: bool):
    probe = tmp_path / "probe.md"
    probe.write_text(f"# Probe\n\n## 4. A section\n\n{line}\n", encoding="utf-8")
    assert bool(findings(probe)) == flagged, findings(probe)

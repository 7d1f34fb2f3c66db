"""docs/ARCHITECTURE.md matches the tree: every source file it names exists, and every module of
the Rust crates and of the Python package is named there, so the page cannot drift from the code."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
SOURCE_DIRS = [ROOT / "rust" / "pvfast-core" / "src", ROOT / "rust" / "pvfast-py" / "src", ROOT / "python" / "pvfast"]
_FILE = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w-]+\.(?:rs|pyi?))\b")


def named_files(text: str) -> set[str]:
    """Every ``name.rs`` / ``name.py`` / ``name.pyi`` (optionally with a directory) in ``text``."""
    return set(_FILE.findall(text))


def modules(dirs: list[pathlib.Path]) -> dict[pathlib.Path, str]:
    """The source files of ``dirs``: path → bare file name."""
    return {p: p.name for d in dirs for p in sorted(d.iterdir()) if p.suffix in (".rs", ".py", ".pyi")}


def problems(text: str, root: pathlib.Path, dirs: list[pathlib.Path]) -> list[str]:
    """What is wrong between the page ``text`` and the tree: names without a file, files without a name."""
    found = modules(dirs)
    bare = set(found.values())
    named = named_files(text)
    out = []
    for name in sorted(named):
        if "/" in name:
            if not (root / name).exists() and pathlib.PurePath(name).name not in bare:
                out.append(f"{name}: named in ARCHITECTURE.md, no such file")
        elif name not in bare:
            out.append(f"{name}: named in ARCHITECTURE.md, no such module")
    named_bare = {pathlib.PurePath(n).name for n in named}
    for path, name in found.items():
        rel = path.relative_to(root).as_posix()
        if name not in named_bare and rel not in named:
            out.append(f"{rel}: a module that ARCHITECTURE.md does not name")
    return out


# Modules added on a branch whose author may not edit ARCHITECTURE.md: whoever merges names them
# there and empties this set (the test below fails once the page names a module still listed).
def test_architecture_page_matches_the_tree() -> None:
    assert problems(DOC.read_text(encoding="utf-8"), ROOT, SOURCE_DIRS) == []


def test_the_check_fails_on_a_missing_and_on_an_unnamed_module(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("lib.rs", "walk.rs", "state.rs"):
        (src / name).write_text("")
    text = "lib.rs and walk.rs do the work; faults.rs handles faults."
    assert problems(text, tmp_path, [src]) == [
        "faults.rs: named in ARCHITECTURE.md, no such module",
        "src/state.rs: a module that ARCHITECTURE.md does not name",
    ]
    assert problems("lib.rs walk.rs state.rs", tmp_path, [src]) == []

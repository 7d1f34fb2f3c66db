"""Every Python block of docs/EXAMPLES.md and docs/COMMANDS.md runs, each as its own program.

A block whose first line is ``# file: NAME.py`` is a pytest file: it is written under that name and
run with pytest (the pvfast plugin provides its fixtures). Any other block runs with ``python``.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ["docs/EXAMPLES.md", "docs/COMMANDS.md"]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(page: str) -> list[tuple[str, str]]:
    """(id, code) of each Python block of ``page``; the id names the page, section and position."""
    text = (ROOT / page).read_text(encoding="utf-8")
    out = []
    for match in _BLOCK.finditer(text):
        before = text[: match.start()]
        headings = re.findall(r"^#+ (.+)$", before, re.MULTILINE)
        section = re.sub(r"\W+", "-", headings[-1]).strip("-").lower() if headings else "top"
        out.append((f"{pathlib.PurePath(page).stem}:{section}:{before.count('```python')}", match.group(1)))
    return out


ALL = [block for page in PAGES for block in blocks(page)]


def test_the_pages_have_examples():
    assert len(blocks("docs/EXAMPLES.md")) >= 9
    assert blocks("docs/COMMANDS.md")


@pytest.mark.parametrize("code", [code for _, code in ALL], ids=[name for name, _ in ALL])
def test_example_runs(code: str, tmp_path: pathlib.Path) -> None:
    first = code.splitlines()[0]
    if first.startswith("# file: "):
        path = tmp_path / first.removeprefix("# file: ").strip()
        path.write_text(code, encoding="utf-8")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)]
    else:
        path = tmp_path / "example.py"
        path.write_text(code, encoding="utf-8")
        cmd = [sys.executable, str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, check=False, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr

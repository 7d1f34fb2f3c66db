"""The package is typed: mypy passes on it and the native stub matches the compiled module."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_native_stub_matches_module():
    out = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "pvfast._native"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_on_package():
    out = subprocess.run([sys.executable, "-m", "mypy", "python/pvfast"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_py_typed_is_shipped():
    import pvfast

    assert (pathlib.Path(pvfast.__file__).parent / "py.typed").exists()

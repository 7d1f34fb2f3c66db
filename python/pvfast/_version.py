"""The package version (the one definition; pyproject.toml carries the same number for pip)."""

__version__ = "0.1.0"

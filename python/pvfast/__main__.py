"""``python -m pvfast``: the same command line as the ``pvfast`` console script."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

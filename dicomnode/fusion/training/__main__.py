"""`python -m dicomnode.fusion.training build-db|fit|refine|pack ...`: the `dicomnode train` commands."""

from __future__ import annotations

import sys

from dicomnode.fusion.training.cli import main

if __name__ == "__main__":
    sys.exit(main())

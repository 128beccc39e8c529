"""``python -m p2pml`` runs the command line."""

from __future__ import annotations

import sys

from p2pml.cli import main

if __name__ == "__main__":
    sys.exit(main())

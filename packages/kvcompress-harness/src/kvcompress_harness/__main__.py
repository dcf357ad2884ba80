"""``python -m kvcompress_harness`` is the ``kvcompress`` command (what ``torchrun -m kvcompress_harness`` runs)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

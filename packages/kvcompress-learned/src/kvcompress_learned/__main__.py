"""``python -m kvcompress_learned train ...``: the same as the ``kvcompress-learned`` command."""

import sys

from .cli import main

sys.exit(main())

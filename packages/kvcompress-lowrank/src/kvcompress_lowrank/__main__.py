"""``python -m kvcompress_lowrank``: the ``kvcompress-lowrank`` command."""

import sys

from .cli import main

sys.exit(main())

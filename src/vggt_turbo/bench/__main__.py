"""``python -m vggt_turbo.bench``."""

import sys

from .cli import main

sys.exit(main())

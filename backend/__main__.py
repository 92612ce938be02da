"""``python -m backend``: see ``backend.cli``."""

import sys

from .cli import main

sys.exit(main())

"""``python -m structure_api``: the same as the ``structure-api`` command."""

import sys

from .cli import main

sys.exit(main())

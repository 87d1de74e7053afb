"""``python -m altlora``: the same as the ``altlora`` command."""

import sys

from .cli import main

sys.exit(main())

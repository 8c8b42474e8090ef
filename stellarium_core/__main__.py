"""``python -m stellarium_core`` runs the ``stellar`` command line."""

import sys

from stellarium_core.cli import main

sys.exit(main())

"""``python -m sandboxnb`` runs the command line."""

import sys

from sandboxnb.cli import main

sys.exit(main())

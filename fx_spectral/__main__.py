"""``python -m fx_spectral``: the same as the ``fx-spectral`` command."""

import sys

from fx_spectral.cli import main

sys.exit(main())

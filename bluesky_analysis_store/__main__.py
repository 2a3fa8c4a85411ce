"""``python -m bluesky_analysis_store``: the ``bluesky-analysis-store`` command line."""

import sys

from .cli import main

sys.exit(main())

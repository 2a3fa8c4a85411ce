"""``python -m bluesky_analysis_store.cli``, the same as ``bluesky-analysis-store``."""

import sys

from . import main

sys.exit(main())

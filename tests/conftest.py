"""Suite-wide settings: every test process (xdist workers and the ranks they spawn) shares one quick
built-in measurement of this machine's rates (``CpuRates.quick``, a few seconds, file-locked), instead
of each measuring its own."""

import os
import tempfile
from pathlib import Path

SHARED_RATES = Path(tempfile.gettempdir()) / "autopar-tests-quick-rates.json"
os.environ.setdefault("AUTOPAR_QUICK_RATES", str(SHARED_RATES))

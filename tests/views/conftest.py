"""The view tests' helpers (``view_plans``, ``chromium_cdp``) import by name, as elsewhere in tests/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

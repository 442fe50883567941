"""Kernel tests run Triton's CPU interpreter.

``TRITON_INTERPRET=1`` is set for each test here (and restored after it), never for the
process, so other test directories sharing an xdist worker keep the SDPA fallback. The kernels
read the variable at every call (``autopar.kernels.flash_common.launchable``), so it need not be
set before Triton is imported — torch imports Triton while autopar is imported.
"""

import pytest

from autopar.kernels.attention import triton_available


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    if not triton_available():
        pytest.skip("Triton is not installed (pip install autopar[triton])")
    monkeypatch.setenv("TRITON_INTERPRET", "1")

"""Plain ``torchrun`` launches a script that only calls ``autopar.compile``: autopar joins the
launcher's process group itself (issue 16 item 8), and training equals one process."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "helpers" / "scripts" / "torchrun_train.py"


def test_torchrun_without_init_process_group():
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this interpreter")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parents[3])}
    result = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(SCRIPT)], env=env,
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    pairs = re.findall(r"loss (\S+) reference (\S+)", result.stdout)
    assert len(pairs) == 2, result.stdout
    for loss, expected in pairs:
        assert abs(float(loss) - float(expected)) <= 1e-5 * max(1.0, abs(float(expected))), pairs

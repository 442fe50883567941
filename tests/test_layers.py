"""The layer contract (pyproject.toml [tool.importlinter], docs/ARCHITECTURE.md) holds: each layer of
autopar imports only the layers below it, and no package's modules import each other in a cycle."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_import_contracts_are_kept():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.fail("lint-imports is missing: install the dev extra (make test does)")
    result = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout[-2000:]


def test_autopar_never_imports_benchmarks():
    offenders = [str(path.relative_to(ROOT)) for folder in ("autopar", "passes", "kernels", "cost_models")
                 for path in (ROOT / folder).rglob("*.py")
                 if any(line.lstrip().startswith(("import benchmarks", "from benchmarks"))
                        for line in path.read_text().splitlines())]
    assert offenders == []

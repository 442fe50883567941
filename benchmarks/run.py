"""``python -m benchmarks.run --suite NAME [--out DIR]``: run one named benchmark sweep.

The same driver as ``autopar sweep`` (``benchmarks.sweep.driver.run_suite``); suites are listed
in ``benchmarks.sweep.cases.SUITES``. Results land in ``benchmarks/results/sweeps/`` by default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.sweep.cases import SUITES
from benchmarks.sweep.driver import DEFAULT_OUT, run_suite


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True, help=f"one of: {', '.join(SUITES)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    try:
        summary = run_suite(args.suite, out=args.out)
    except ValueError as error:
        print(f"benchmarks.run: error: {error}", file=sys.stderr)
        return 2
    print(f"{summary.suite}: ran {summary.ran}, already done {summary.resumed}, skipped {summary.skipped}, "
          f"failed {summary.failed}; wrote {', '.join(str(p) for p in summary.files)}")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())

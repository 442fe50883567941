"""``autopar diff A B``: what changed between two plans, and by how much.

Data flow: two plan files → ``Plan.load`` each → ``autopar.views.diff.render_diff`` → a table
of the changed fields (degrees, schedule, stage split, recomputation, memory, predicted step
time and its breakdown, passes) with the change of each.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from autopar.plans import Plan
from autopar.views.diff import render_diff


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("diff", help="compare two plans: degrees, stages, memory, predicted time")
    p.add_argument("a", help="the first plan JSON file")
    p.add_argument("b", help="the second plan JSON file")
    p.add_argument("--all", action="store_true", help="show unchanged fields too")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    first, second = Plan.load(args.a), Plan.load(args.b)
    console.print(render_diff(first, second, names=(args.a, args.b), show_all=args.all))
    return 0

"""``autopar explain PLAN [NODE_OR_MODULE]``: why this plan, this stage, this sharding.

Data flow: plan file → ``Plan.load`` → ``autopar.views.build_view`` → ``views.explain``: the
whole plan (degrees and what each costs, the binding memory constraint, stage balance,
recomputation, shardings, alternatives with their predicted costs), or one layer, module or
graph node (``12``, ``blocks.12``, ``blocks.12.attn.qkv``, ``blocks_12_attn_qkv``).
"""

from __future__ import annotations

import argparse

from rich.console import Console

from autopar.plans import Plan
from autopar.views import build_view
from autopar.views.explain import explain_plan, explain_target


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("explain", help="why a plan was chosen: degrees, memory, stages, alternatives")
    p.add_argument("plan", help="the plan JSON file")
    p.add_argument("target", nargs="?", metavar="NODE_OR_MODULE",
                   help="a layer index, module path (blocks.12.attn.qkv) or fx node name to explain")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    view = build_view(Plan.load(args.plan), timeline=False)
    console.print(explain_plan(view) if args.target is None else explain_target(view, args.target))
    return 0

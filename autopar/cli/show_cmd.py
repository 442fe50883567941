"""``autopar show PLAN [--html REPORT] [--format text|json|dot]``: look at a plan file.

Data flow: plan JSON → ``Plan.load`` (validated; a missing, corrupt or wrong-version file is
one line and exit 2) → ``autopar.views.build_view`` → the terminal view (``views.text``), the
JSON summary (``views.summary``), Graphviz DOT (``views.dot``) and/or the self-contained
HTML report (``views.html``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console

from autopar.plans import Plan
from autopar.views import PlanView, build_view


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("show", help="show a plan: terminal summary, HTML report, JSON or DOT",
                              description="Show a plan file made by `autopar plan` (or autopar.plan).")
    p.add_argument("plan", help="the plan JSON file")
    p.add_argument("--html", metavar="REPORT", help="also write a self-contained HTML report to this file")
    p.add_argument("--format", choices=("text", "json", "dot"), default=None,
                   help="what to print (default: text, or nothing but a line when --html is given)")
    p.set_defaults(run=run)


def write_report(view: PlanView, path: str, console: Console, started: float) -> None:
    """Render the HTML report to ``path`` and say where it went, how big, how fast."""
    from autopar.views.html import render_html

    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--html {path!r} is a directory; give a file name such as report.html")
    if not target.parent.is_dir():
        raise ValueError(f"--html {path!r}: folder {str(target.parent)!r} does not exist")
    text = render_html(view)
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot write the report to {path!r}: {error.strerror}") from None
    console.print(f"wrote {path} ({len(text.encode()) / 1024:,.0f} KiB, rendered in "
                  f"{time.perf_counter() - started:.2f} s)", markup=False, highlight=False, soft_wrap=True)


def run(args: argparse.Namespace, console: Console) -> int:
    started = time.perf_counter()
    plan = Plan.load(args.plan)
    form = args.format or (None if args.html else "text")
    view = build_view(plan, timeline=bool(args.html) or form in ("json", "dot"))
    if args.html:
        write_report(view, args.html, console, started)
    if form == "text":
        from autopar.views.text import render

        console.print(render(view, width=console.width))
    elif form == "json":
        from autopar.views.summary import render_json

        sys.stdout.write(render_json(view))
    elif form == "dot":
        from autopar.views.dot import render_dot

        sys.stdout.write(render_dot(view))
    return 0

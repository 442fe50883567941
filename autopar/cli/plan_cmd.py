"""``autopar plan MODEL --cluster SPEC --batch B [--seq S] [--fix K=V,...] [-o plan.json]``.

Data flow: MODEL → ``autopar.model_source.resolve`` (zoo name, ``module:callable`` or HF
``config.json``, built on ``meta``) → ``autopar.lower`` (capture, passes, profiles priced in the
training dtype) → ``autopar.plan_api.search_program`` (the planner's search with a progress display)
→ the Plan, fingerprinted on the graph of its microbatch (``autopar.lower.with_fingerprint``), whose
``model`` field records MODEL and whose predictions hold the per-stage numbers the views draw → saved
with ``-o``, shown with ``autopar.views.text``, optionally written as an HTML report. An infeasible
request is one line naming the binding memory constraint (``autopar.planner``), exit code 2.

``--dtype auto`` plans bf16 training on GPU clusters and keeps the model's own dtype on CPU
(``local``) clusters: a meta-device model is fp32, and planning fp32 for an A100 would use its
fp32 peak, about a sixteenth of its bf16 peak. The dtype only prices the plan: the model is captured
as MODEL builds it, so the plan's fingerprint is that of the graph ``autopar.compile`` captures
from the model the same MODEL builds on a real device (a cast copy would fingerprint another graph).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console

from autopar.cli.moe_args import check_one_line
from autopar.cli.pass_args import add_pass_arguments, passes_from_args
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.model_source import Resolved, resolve
from autopar.passes import GraphPass

if TYPE_CHECKING:
    from autopar.planner.search import SearchResult

FIX_EXAMPLE = "tp=8,pp=4,schedule=1f1b"
FIX_KEYS = tuple(f.name for f in dataclasses.fields(Fix))
DTYPES = ("bf16", "fp16", "fp32")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="plan a model for a cluster and show the plan",
                              description="Search degrees, schedule, stage split and recomputation for "
                                          "MODEL on the cluster; print the plan, save it with -o.")
    p.add_argument("model", help="zoo name (gpt3-175b), module:callable, or an HF config.json path")
    p.add_argument("--cluster", required=True,
                   help="cluster spec: 128x8xA100-80GB, local:4, or a .toml/.json file")
    p.add_argument("--batch", type=int, required=True, help="global batch size in sequences")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's)")
    p.add_argument("--fix", default=None, metavar="K=V,...",
                   help=f"pin choices, e.g. {FIX_EXAMPLE} (keys: {', '.join(FIX_KEYS)})")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="training dtype (default auto: bf16 on GPU clusters, the model's own on CPU)")
    p.add_argument("--time-limit", type=float, default=60.0, metavar="S",
                   help="search time limit in seconds (default 60)")
    p.add_argument("-o", "--output", metavar="PLAN", help="save the plan as JSON to this file")
    p.add_argument("--html", metavar="REPORT", help="also write the HTML report to this file")
    add_pass_arguments(p)  # --random-ltd ..., --moe ... (autopar.cli.pass_args)
    p.set_defaults(run=run)


def graph_passes(args: argparse.Namespace) -> list[GraphPass]:
    """The graph passes the command line asks for (``--random-ltd ...``, ``--moe ...``)."""
    return passes_from_args(args)


def parse_fix(text: str | None) -> dict[str, Any]:
    """``tp=8,pp=4,schedule=1f1b`` → ``{'tp': 8, 'pp': 4, 'schedule': '1f1b'}``, validated by ``Fix``."""
    if text is None:
        return {}
    check_one_line("--fix", text)
    pins: dict[str, Any] = {}
    for part in text.split(","):
        key, equals, value = (s.strip() for s in part.partition("="))
        if not equals or not key or not value:
            raise ValueError(f"--fix: {part.strip()!r} is not KEY=VALUE; expected e.g. --fix {FIX_EXAMPLE}")
        if key in pins:
            raise ValueError(f"--fix: {key} is given twice")
        pins[key] = _fix_value(value)
    try:
        Fix.from_dict(pins)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--fix: {error}") from None
    return pins


def _fix_value(text: str) -> int | bool | str:
    """``8`` → 8, ``true``/``false`` (any case) → a bool (``sequence_parallel=true``), else the text."""
    if text.lstrip("-").isdecimal():
        return int(text)
    return {"true": True, "false": False}.get(text.lower(), text)


def _training_dtype(choice: str) -> str | None:
    """The dtype the profile prices; None: ``autopar.lower.profile_of``'s default (bf16 on GPU clusters,
    the parameters' dtype on CPU clusters)."""
    return None if choice == "auto" else choice


def _search(resolved: Resolved, args: argparse.Namespace, *, cluster: ClusterSpec, pins: dict[str, Any],
            passes: list[GraphPass], progress: _Progress) -> SearchResult:
    """The search's result on the model as MODEL builds it, its Plan fingerprinted on the graph that
    ``autopar.compile`` captures at the plan's microbatch."""
    from autopar.lower import lower, with_fingerprint
    from autopar.plan_api import search_program

    program = lower(resolved.model, resolved.args, example_kwargs=resolved.kwargs, passes=passes,
                    cluster=cluster, dtype=_training_dtype(args.dtype))
    result = search_program(program, cluster=cluster, global_batch_size=args.batch, fix=pins,
                            time_limit_s=args.time_limit, progress=progress)
    plan = result.plan
    if plan.schedule.microbatch_size != program.batch_size:
        plan = with_fingerprint(plan, resolved.model, resolved.args, passes=passes,
                                example_kwargs=resolved.kwargs)
    return dataclasses.replace(result, plan=dataclasses.replace(plan, model=resolved.name))


class _Progress:
    """The search's progress on a rich status line (terminals only)."""

    def __init__(self, console: Console, model: str) -> None:
        self.console, self.model, self.status = console, model, None
        self.started = time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.console.is_terminal:
            self.status = self.console.status(f"capturing {self.model} …")
            self.status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)

    def __call__(self, done: int, total: int, best_s: float | None) -> None:
        if self.status is not None:
            best = "" if best_s is None else f", best {best_s:.3g} s/step"
            self.status.update(f"searching {self.model}: {done}/{total} configurations{best} "
                               f"({time.perf_counter() - self.started:.0f} s)")


def run(args: argparse.Namespace, console: Console) -> int:
    from autopar.views import build_view
    from autopar.views.text import render

    pins = parse_fix(args.fix)
    cluster = ClusterSpec.parse(args.cluster)
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1 (the global batch in sequences), got {args.batch}")
    if args.time_limit <= 0:
        raise ValueError(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    _check_output("-o", args.output)
    _check_output("--html", args.html)
    passes = graph_passes(args)
    started = time.perf_counter()
    with _Progress(console, args.model) as progress:
        resolved = resolve(args.model, batch_size=1, seq_len=args.seq)
        result = _search(resolved, args, cluster=cluster, pins=pins, passes=passes, progress=progress)
    plan = result.plan
    if args.output:
        _save(plan, args.output)
    view = build_view(plan, timeline=bool(args.html))
    console.print(render(view, width=console.width))
    exact = "optimal over the search space" if result.exact else (
        "time limit reached" if result.timed_out else "not proven optimal")
    console.print(f"planned in {time.perf_counter() - started:.1f} s: {result.configs_evaluated} of "
                  f"{result.configs_total} configurations evaluated, {result.configs_pruned} pruned by "
                  f"bounds, {result.configs_infeasible} out of memory ({exact})",
                  markup=False, highlight=False)
    if args.output:
        console.print(f"wrote {args.output}", markup=False, highlight=False, soft_wrap=True)
    if args.html:
        from autopar.cli.show_cmd import write_report

        write_report(view, args.html, console, time.perf_counter())
    return 0


def _check_output(option: str, path: str | None) -> None:
    """Fail before the search, not after it, when an output file cannot be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        raise ValueError(f"{option} {path!r}: " + ("is a directory; give a file name" if os.path.isdir(path)
                                                   else f"folder {folder!r} does not exist"))


def _save(plan: Any, path: str) -> None:
    try:
        plan.save(path)
    except OSError as error:
        raise ValueError(f"cannot save the plan to {path!r}: {error.strerror or error}") from None

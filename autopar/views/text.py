"""The terminal view of a plan (``autopar show``, ``autopar plan``), drawn with rich.

Data flow: :class:`~autopar.views.model.PlanView` → :func:`render` → rich renderables printed
by the CLI. Sections: the header (cluster, mesh, degrees, schedule, predicted step time,
tokens/s, MFU, peak memory), the stage table (layers, devices, parameters, forward/backward and
communication time per microbatch, a memory bar against capacity), the step-time breakdown, the top
alternatives and the graph passes. Fits 100 columns; strings from the model are passed as
``Text`` so rich never reads them as markup; bars are characters, readable without colour.
"""

from __future__ import annotations

import re

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from autopar import fmt
from autopar.plans import BREAKDOWN_KEYS, Plan
from autopar.views.model import PlanView, StageRow

NUM_ALTERNATIVES = 5
_DELTA_PREFIX = re.compile(r"^[^:]*: [+−-][\d.]+ \S+ \([+−-][\d.]+ %\),? ")
BAR_WIDTH = 10
BREAKDOWN_LABELS = {
    "compute": "compute", "recompute": "recompute", "tp_comm": "TP comm", "cp_comm": "CP ring",
    "pp_comm": "PP comm",
    "dp_comm": "DP comm", "ep_comm": "EP all-to-all", "bubble": "bubble", "optimizer": "optimizer",
}


def bar(value: float, total: float, width: int = BAR_WIDTH) -> str:
    """'██████░░░░' for value/total (clipped to the width; '!' marks an overflow)."""
    if total <= 0:
        return " " * width
    filled = min(width, round(width * value / total))
    return "█" * filled + "░" * (width - filled) + ("!" if value > total else "")


def describe_config(parallelism, schedule, zero: int | None = None) -> str:
    """'dp16 tp8 pp8 · 1f1b b1×m96' (' sp' after tp with sequence parallelism, ' cp4' with context
    parallelism, ' v2' when interleaved, ' zero1' when given)."""
    text = (f"dp{parallelism.dp} tp{parallelism.tp}" + (" sp" if parallelism.sequence_parallel else "")
            + f" pp{parallelism.pp}"
            + (f" cp{parallelism.cp}" if parallelism.cp > 1 else "")
            + (f" ep{parallelism.ep}" if parallelism.ep > 1 else "")
            + f" · {schedule.name} b{schedule.microbatch_size}×m{schedule.num_microbatches}")
    text += f" v{schedule.virtual_stages}" if schedule.virtual_stages > 1 else ""
    return text + (f" zero{zero}" if zero else "")


def cluster_line(plan: Plan) -> str:
    c, device = plan.cluster, plan.cluster["device"]
    nodes = f"{c['num_nodes']} node{'s' if c['num_nodes'] > 1 else ''}"
    return (f"{c['text']}: {c['num_nodes'] * c['devices_per_node']:,} × {device['name']} "
            f"({nodes} × {c['devices_per_node']}), {fmt.nbytes(device['memory_bytes'])} each")


def header(view: PlanView) -> Table:
    plan, pred = view.plan, view.plan.predicted
    table = Table(title=Text(f"plan · {plan.model}"), title_justify="left", show_header=False, box=None,
                  padding=(0, 1), pad_edge=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    mesh = " × ".join(f"{n} {s}" for n, s in zip(plan.mesh.axis_names, plan.mesh.shape, strict=True))
    peak = max(pred.peak_memory_bytes) if pred.peak_memory_bytes else None
    rows = [
        ("model", plan.model), ("cluster", cluster_line(plan)), ("mesh", mesh),
        ("plan", describe_config(plan.parallelism, plan.schedule, plan.zero)),
        ("batch", f"{plan.global_batch_size:,} sequences"
                  + (f" × {plan.seq_len:,} tokens" if plan.seq_len else "")),
        ("step time", fmt.seconds(pred.step_time_s) + "  (predicted)"),
        ("throughput", "—" if pred.tokens_per_s is None else f"{pred.tokens_per_s:,.0f} tokens/s"),
        ("MFU", fmt.percent(pred.mfu) + ("" if pred.tflops_per_device is None
                                          else f"  ({pred.tflops_per_device:.1f} TFLOP/s per device)")),
        ("peak memory", "—" if peak is None else f"{fmt.nbytes(peak)} of {fmt.nbytes(view.capacity_bytes)} "
                                                 f"({fmt.percent(peak / view.capacity_bytes)})"),
    ]
    for name, value in rows:
        table.add_row(name, Text(value))
    return table


def _stage_cells(view: PlanView, stages: list[StageRow]) -> list[str]:
    """Layers, devices, parameters, forward, backward, communication, recompute, memory of stages
    sharing devices."""
    memory = {d: row for row in view.memory for d in row.devices}
    row = memory.get(stages[0].devices[0])
    times = [s.times for s in stages if s.times]
    params = [s.params_per_device for s in stages if s.params_per_device is not None]
    stored = [s.prediction for s in stages if s.prediction is not None]
    comm = sum(p.tp_comm_s + p.ep_comm_s + p.cp_comm_s + p.dp_comm_s + p.send_forward_s + p.send_backward_s
               for p in stored)
    first = stages[0]
    if len(stages) > 1:
        span = f"{sum(s.num_layers for s in stages)} ({len(stages)}×{first.num_layers})"
    else:
        span = first.span
    return [span, fmt.id_ranges(first.devices), fmt.count(sum(params)) if params else "—",
            fmt.seconds(sum(t.forward_s for t in times) if times else None),
            fmt.seconds(sum(t.backward_s + t.backward_weight_s for t in times) if times else None),
            fmt.seconds(comm) if stored else "—",
            "/".join(sorted({s.recompute for s in stages})),
            "—" if row is None else fmt.nbytes(row.total_bytes),
            "" if row is None else bar(row.total_bytes, view.capacity_bytes, 8)]


def stage_table(view: PlanView, *, width: int = 100) -> Table:
    """One row per stage; under interleaving one row per pipeline rank (its chunks summed). Below
    90 columns the memory bars are left out. ``comm`` is the communication inside fwd and bwd
    (tensor-parallel, all-to-all, per-microbatch data-parallel) plus the P2P sends."""
    pp, interleaved = view.plan.parallelism.pp, view.plan.schedule.virtual_stages > 1
    approx = "" if view.exact or not any(s.times for s in view.stages) else "; times approximated from totals"
    title = (f"pipeline ranks (rank r runs stages r, r+{pp}, …; per microbatch{approx})" if interleaved
             else f"pipeline stages (per microbatch{approx})")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1),
                  collapse_padding=True)
    first = ("rank", "stages") if interleaved else ("stage",)
    bars = width >= 90
    for name in (*first, "layers", "devices", "params", "fwd", "bwd", "comm", "recomp", "memory",
                 *(["of capacity"] if bars else [])):
        right = name in ("stage", "rank", "params", "fwd", "bwd", "comm", "memory")
        table.add_column(name, justify="right" if right else "left", no_wrap=True)
    groups = ([[s for s in view.stages if s.rank == rank] for rank in range(pp)] if interleaved
              else [[s] for s in view.stages])
    for mine in groups:
        cells = _stage_cells(view, mine)
        head = [str(mine[0].index)] if not interleaved else [str(mine[0].rank),
                                                             f"{mine[0].index}…{mine[-1].index}"]
        table.add_row(*head, *(cells if bars else cells[:-1]))
    return table


def breakdown_table(plan: Plan) -> Table | None:
    parts, total = plan.predicted.breakdown_dict(), plan.predicted.step_time_s
    if not parts or not total:
        return None
    table = Table(title="predicted step time", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  padding=(0, 1), collapse_padding=True)
    for name in ("part", "time", "share", ""):
        table.add_column(name, justify="left" if name in ("part", "") else "right")
    for key in BREAKDOWN_KEYS:
        if parts.get(key):
            table.add_row(BREAKDOWN_LABELS[key], fmt.seconds(parts[key]), fmt.percent(parts[key] / total),
                          bar(parts[key], total, 20))
    table.add_row("step", fmt.seconds(total), "100.0 %", "", style="bold")
    return table


def alternatives_table(plan: Plan, limit: int = NUM_ALTERNATIVES) -> Table | None:
    if not plan.alternatives:
        return None
    best = plan.predicted.step_time_s
    table = Table(title=f"alternatives considered (top {min(limit, len(plan.alternatives))} of "
                        f"{len(plan.alternatives)})", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, padding=(0, 1), collapse_padding=True)
    table.add_column("#", justify="right")
    table.add_column("configuration", no_wrap=True)
    table.add_column("step", justify="right")
    table.add_column("Δ", justify="right")
    table.add_column("why not", overflow="fold")
    for number, alt in enumerate(plan.alternatives[:limit], 1):
        step = alt.predicted_step_time_s
        delta = "—" if step is None or not best else f"{100 * (step - best) / best:+.1f} %"
        reason = _DELTA_PREFIX.sub("", alt.reason)  # the planner's "config: +Δ s (+Δ %), " repeats columns
        table.add_row(str(number), describe_config(alt.parallelism, alt.schedule), fmt.seconds(step), delta,
                      Text(reason))
    return table


def passes_line(plan: Plan) -> Text:
    if not plan.passes:
        return Text("graph passes: none")
    items = [p.name + (" (" + ", ".join(f"{k}={v}" for k, v in p.config) + ")" if p.config else "")
             for p in plan.passes]
    return Text("graph passes: " + "; ".join(items))


def render(view: PlanView, *, width: int = 100) -> RenderableType:
    """Everything ``autopar show`` prints, as one rich Group, for a terminal ``width`` wide."""
    parts: list[RenderableType] = [header(view), stage_table(view, width=width)]
    parts += [t for t in (breakdown_table(view.plan), alternatives_table(view.plan)) if t is not None]
    parts += [passes_line(view.plan), Text(f"per-stage numbers: {view.source}", style="dim")]
    return Group(*parts)

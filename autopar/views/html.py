"""The self-contained HTML report of a plan (``autopar show plan.json --html report.html``).

Data flow: :class:`~autopar.views.model.PlanView` → :func:`render_html` → one HTML string with
inline CSS, SVG and a small script, written by the CLI. Sections: summary cards, the device
mesh coloured by stage, the layer→stage map and stage table, the pipeline timeline per rank
(simulated from the stage times the plan stores), memory per device by category against
capacity, the step-time breakdown, alternatives, graph passes and the folded shardings. No
network: no external URL anywhere, and a Content-Security-Policy that forbids loading anything
and runs only the report's own script.
Every string from the plan is escaped (``views.svg.esc``). Output is deterministic.
"""

from __future__ import annotations

from autopar import fmt
from autopar.plans import BREAKDOWN_KEYS
from autopar.views import svg, timeline
from autopar.views.assets import BREAKDOWN_COLOURS, CSP, CSS, JS, MEMORY_COLOURS, rank_colour
from autopar.views.model import PlanView, StageRow, communication_s
from autopar.views.names import fold
from autopar.views.svg import esc
from autopar.views.text import BREAKDOWN_LABELS, cluster_line, describe_config

MAX_OPEN_ROWS = 16


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """Cells are pre-escaped HTML; columns in ``numeric`` align right."""
    def cls(i: int) -> str:
        return ' class="n"' if i in numeric else ""
    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cards(view: PlanView) -> str:
    pred, plan = view.plan.predicted, view.plan
    peak = max(pred.peak_memory_bytes) if pred.peak_memory_bytes else None
    cards = [
        ("step time (predicted)", fmt.seconds(pred.step_time_s)),
        ("tokens / s", "—" if pred.tokens_per_s is None else f"{pred.tokens_per_s:,.0f}"),
        ("MFU", fmt.percent(pred.mfu)),
        ("TFLOP/s per device", "—" if pred.tflops_per_device is None else f"{pred.tflops_per_device:.1f}"),
        ("peak memory / capacity", "—" if peak is None else
         f"{fmt.nbytes(peak)} / {fmt.nbytes(view.capacity_bytes)}"),
        ("devices", f"{plan.world_size:,}"),
    ]
    items = "".join(f'<div class="card"><b>{esc(value)}</b><span>{esc(name)}</span></div>'
                    for name, value in cards)
    return f'<div class="cards">{items}</div>'


def _comm_cell(s: StageRow) -> str:
    """Communication per microbatch inside the stage's forward and backward, plus its sends."""
    parts = communication_s(s)
    if parts is None:
        return "—"
    return "<br>".join(f"{kind.upper()} {esc(fmt.seconds(value))}" for kind, value in parts) or "none"


def _stage_rows(view: PlanView) -> str:
    memory = {d: row for row in view.memory for d in row.devices}
    named = any(s.first_node or s.last_node for s in view.stages)
    rows = []
    for s in view.stages:
        t, mem = s.times, memory.get(s.devices[0])
        nodes = " → ".join(n for n in (s.first_node, s.last_node) if n) or "—"
        rows.append([
            f'<span data-rank="{s.rank}" style="color:{rank_colour(s.rank)}">■</span> {s.index}',
            str(s.rank), s.span,
            esc(fmt.id_ranges(s.devices)),
            "—" if s.params_per_device is None else esc(fmt.count(s.params_per_device)),
            esc(fmt.seconds(t.forward_s if t else None)),
            esc(fmt.seconds(t.backward_s + t.backward_weight_s if t else None)),
            _comm_cell(s),
            esc(s.recompute) + (f" ({esc(fmt.seconds(t.recompute_s))})" if t and t.recompute_s else ""),
            "—" if mem is None else esc(fmt.nbytes(mem.total_bytes)),
            *([f"<code>{esc(nodes)}</code>"] if named else [])])
    table = _table(["stage", "rank", "layers", "devices", "params / device", "forward / mb", "backward / mb",
                    "communication / mb", "recompute", "memory / device", *(["fx nodes"] if named else [])],
                   rows, {1, 4, 5, 6, 7, 9})
    if len(rows) <= MAX_OPEN_ROWS:
        return table
    return f"<details><summary>{len(rows)} stages (per microbatch on one device)</summary>{table}</details>"


def _breakdown(view: PlanView) -> str:
    parts, total = view.plan.predicted.breakdown_dict(), view.plan.predicted.step_time_s
    items = [(BREAKDOWN_LABELS[k], BREAKDOWN_COLOURS[k]) for k in BREAKDOWN_KEYS if parts.get(k)]
    rows = [[esc(BREAKDOWN_LABELS[k]), esc(fmt.seconds(parts[k])), esc(fmt.percent(parts[k] / total))]
            for k in BREAKDOWN_KEYS if parts.get(k) and total]
    return svg.breakdown_bar(view.plan) + svg.legend(items) + (
        _table(["part", "time", "share of step"], rows, {1, 2}) if rows else "")


def _alternatives(view: PlanView) -> str:
    plan = view.plan
    if not plan.alternatives:
        return '<p class="note">none recorded (a pinned plan, or the planner kept no runner-ups)</p>'
    best = plan.predicted.step_time_s
    rows = []
    for number, alt in enumerate(plan.alternatives, 1):
        step = alt.predicted_step_time_s
        delta = "—" if step is None or not best else f"{100 * (step - best) / best:+.1f} %"
        rows.append([str(number), esc(describe_config(alt.parallelism, alt.schedule)),
                     esc(fmt.seconds(step)), esc(delta), esc(alt.reason)])
    chosen = [["✓", esc(describe_config(plan.parallelism, plan.schedule, plan.zero)),
               esc(fmt.seconds(best)), "", "chosen"]]
    return _table(["#", "configuration", "predicted step", "Δ", "reason"], chosen + rows, {2, 3})


def _passes(view: PlanView) -> str:
    if not view.plan.passes:
        return '<p class="note">none: the model was planned as captured</p>'
    rows = [[f"<code>{esc(p.name)}</code>",
             "<br>".join(f"{esc(k)} = <code>{esc(v)}</code>" for k, v in p.config) or "—"]
            for p in view.plan.passes]
    return _table(["pass", "configuration"], rows)


def _shardings(view: PlanView) -> str:
    if not view.plan.shardings:
        return '<p class="note">no per-node shardings recorded (tensor parallelism off, or not stored)</p>'
    rows = [[f"<code>{esc(f.pattern)}</code>", esc(f.strategy), str(len(f.numbers) or 1),
             esc(fmt.id_ranges(f.numbers)) or "—"] for f in fold(view.plan.shardings)]
    return (f"<details><summary>{len(view.plan.shardings)} nodes in {len(rows)} patterns</summary>"
            + _table(["node (* = layer)", "strategy", "nodes", "layers"], rows, {2}) + "</details>")


def _ranks(view: PlanView) -> list[tuple[str, str]]:
    """Legend entries: one colour per pipeline rank, naming its stages."""
    pp = view.plan.parallelism.pp
    plural = "s" if len(view.stages) > pp else ""
    return [(f"rank {r} · stage{plural} " + ", ".join(str(s.index) for s in view.stages if s.rank == r),
             rank_colour(r)) for r in range(pp)]


def _section(anchor: str, title: str, *content: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>' + "".join(content) + "</section>"


def render_html(view: PlanView) -> str:
    """The whole report as one HTML document."""
    plan = view.plan
    memory_parts = sorted({name for row in view.memory for name, value in row.parts if value > 0},
                          key=list(MEMORY_COLOURS).index)
    config = describe_config(plan.parallelism, plan.schedule, plan.zero)
    batch = f"batch {plan.global_batch_size:,}" + (f" × {plan.seq_len:,} tokens" if plan.seq_len else "")
    axes = " × ".join(f"{n} {s}" for n, s in zip(plan.mesh.axis_names, plan.mesh.shape, strict=True))
    simulated = ("the stage times the cost model stored in the plan" if view.exact
                 else "stage times approximated from the plan's totals")
    body = [
        f"<header><h1>autopar plan · {esc(plan.model)}</h1>",
        f'<p class="sub">{esc(cluster_line(plan))} — {esc(config)} — {esc(batch)}</p>',
        f'<p class="note">{esc(plan.created_by)} · graph fingerprint <code>{esc(plan.graph_fingerprint)}'
        f"</code> · per-stage numbers: {esc(view.source)}</p>", _cards(view), "</header>",
        _section("mesh", "Device mesh", svg.legend(_ranks(view)), '<div class="scroll">', svg.mesh_grid(plan),
                 f'</div><p class="note">mesh axes {esc(axes)}; one box per node; hover a device for its '
                 "coordinates</p>"),
        _section("layers", "Layers → stages", '<div class="scroll">', svg.layer_map(view), "</div>",
                 _stage_rows(view)),
        _section("timeline", "Pipeline timeline per rank", svg.legend(timeline.timeline_legend()),
                 '<div class="scroll">', timeline.timeline_svg(view), "</div>",
                 f'<p class="note">simulation of {simulated} ({esc(plan.schedule.name)}, '
                 f"{plan.schedule.num_microbatches} microbatches).</p>"),
        _section("memory", "Memory per device", svg.legend([(n, MEMORY_COLOURS[n]) for n in memory_parts]),
                 svg.memory_bars(view), '<p class="note">one bar per group of devices with identical '
                 "stages and memory</p>"),
        _section("breakdown", "Step time breakdown", _breakdown(view)),
        _section("alternatives", "Alternatives considered", _alternatives(view)),
        _section("passes", "Graph passes applied", _passes(view)),
        _section("shardings", "Tensor-parallel shardings", _shardings(view)),
    ]
    title = f"autopar plan · {plan.model}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>" + "\n".join(body) + f"<script>{JS}</script></body></html>\n")

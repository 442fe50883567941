"""Inline SVG figures of the HTML report: device mesh, layer→stage map, memory bars, breakdown bar.

Data flow: :class:`~autopar.views.model.PlanView` → these functions → SVG strings embedded by
``views.html`` (the timeline lives in ``views.timeline``). Every text and attribute value
goes through :func:`esc`; colours are per pipeline rank (one per stage unless interleaved), and
elements tied to a rank carry ``data-rank`` so the report's script highlights it everywhere.
"""

from __future__ import annotations

import html
import math

from autopar import fmt
from autopar.plans import BREAKDOWN_KEYS, Plan
from autopar.views.assets import BREAKDOWN_COLOURS, MEMORY_COLOURS, rank_colour
from autopar.views.model import PlanView

WIDTH = 1100


def esc(value: object) -> str:
    """Text or attribute value, HTML-escaped (quotes included)."""
    return html.escape(str(value), quote=True)


def rect(x: float, y: float, w: float, h: float, fill: str, title: str = "", **attrs: object) -> str:
    extra = "".join(f' {name.replace("_", "-")}="{esc(v)}"' for name, v in attrs.items())
    body = f"<title>{esc(title)}</title></rect>" if title else "/>"
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.2f}" height="{h:.1f}" '
            f'fill="{esc(fill)}"{extra}' + (">" + body if title else body))


def text(x: float, y: float, value: object, anchor: str = "start") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{esc(value)}</text>'


def svg(width: float, height: float, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{esc(label)}">'
            + "".join(body) + "</svg>")


def device_stages(plan: Plan) -> list[list[int]]:
    held: list[list[int]] = [[] for _ in range(plan.world_size)]
    for stage in plan.stages:
        for device in stage.devices:
            held[device].append(stage.index)
    return held


def mesh_coordinates(plan: Plan) -> dict[int, str]:
    """Device id → 'pp 0 · dp 3 · tp 1' from the mesh's row-major device order."""
    mesh, coords = plan.mesh, {}
    for flat, device in enumerate(mesh.device_ids):
        parts, rest = [], flat
        for name, size in reversed(list(zip(mesh.axis_names, mesh.shape, strict=True))):
            parts.append(f"{name} {rest % size}")
            rest //= size
        coords[device] = " · ".join(reversed(parts))
    return coords


def mesh_grid(plan: Plan) -> str:
    """One cell per device, grouped by node, coloured by the (first) stage it runs."""
    per_node, nodes = plan.cluster["devices_per_node"], plan.cluster["num_nodes"]
    cell = 16 if plan.world_size <= 256 else 11
    node_w = per_node * cell + 8
    fits = max(1, min(nodes, (WIDTH - 10) // node_w))
    per_row = max(d for d in range(1, fits + 1) if nodes % d == 0)  # rows line up with the mesh
    per_row = fits if per_row < fits // 2 else per_row
    rows = math.ceil(nodes / per_row)
    held, coords, body, pp = device_stages(plan), mesh_coordinates(plan), [], plan.parallelism.pp
    for node in range(nodes):
        x0, y0 = 4 + (node % per_row) * node_w, 4 + (node // per_row) * (cell + 8)
        body.append(rect(x0 - 2, y0 - 2, per_node * cell + 3, cell + 3, "#e8e8e8", f"node {node}"))
        for local in range(per_node):
            device = node * per_node + local
            stages = held[device] if device < len(held) else []
            title = (f"device {device} · node {node} · local {local} · {coords.get(device, '')} · "
                     f"stage{'s' if len(stages) > 1 else ''} {', '.join(map(str, stages)) or '—'}")
            body.append(rect(x0 + local * cell, y0, cell - 1, cell - 1,
                             rank_colour(stages[0] % pp) if stages else "#ccc", title,
                             **({"data_rank": stages[0] % pp} if stages else {})))
    return svg(per_row * node_w + 6, rows * (cell + 8) + 4, body, "device mesh coloured by stage")


def layer_map(view: PlanView) -> str:
    """Embedding, each layer, and head as cells coloured by stage, stage spans labelled below."""
    layers = view.plan.stages[-1].layers[1]
    cap = 46
    cell = max(4.0, min(24.0, (WIDTH - 2 * cap - 20) / max(layers, 1)))
    body, first, last = [], view.stages[0], view.stages[-1]
    body.append(rect(2, 4, cap - 4, 26, rank_colour(first.rank), f"embedding → stage {first.index}",
                     data_rank=first.rank))
    body.append(text(cap / 2, 46, "embed", "middle"))
    x_end = cap + layers * cell
    labelled = all(s.num_layers * cell >= 7 * len(f"S{s.index}") for s in view.stages if s.num_layers)
    for stage in view.stages:
        colour = rank_colour(stage.rank)
        for layer in range(*stage.layers):
            body.append(rect(cap + layer * cell, 4, cell - (1 if cell > 5 else 0), 26, colour,
                             f"layer {layer} → stage {stage.index} (pipeline rank {stage.rank}), "
                             f"recompute {stage.recompute}", data_rank=stage.rank))
        if labelled and stage.num_layers:
            middle = cap + (stage.layers[0] + stage.num_layers / 2) * cell
            body.append(text(middle, 46, f"S{stage.index}", "middle"))
    body.append(rect(x_end + 4, 4, cap - 4, 26, rank_colour(last.rank), f"head → stage {last.index}",
                     data_rank=last.rank))
    body.append(text(x_end + cap / 2 + 2, 46, "head", "middle"))
    return svg(x_end + cap + 6, 52, body, "layer to stage map")


def memory_bars(view: PlanView) -> str:
    """One stacked bar per group of devices with the same memory (by category, as the plan stores
    it), against the capacity."""
    if not view.memory:
        return '<p class="note">the plan predicts no memory</p>'
    label_w, bar_h, gap = 210, 18, 6
    scale = max(view.capacity_bytes, max(r.total_bytes for r in view.memory)) * 1.04
    plot_w = WIDTH - label_w - 90
    body, y = [], 16
    for row in view.memory:
        rank = row.stages[0] % view.plan.parallelism.pp if row.stages else ""
        where = (f"stage {row.stages[0]}" if len(row.stages) == 1 else f"rank {rank}") if row.stages else ""
        label = f"devices {fmt.id_ranges(row.devices)} · {where}"
        body.append(text(4, y + 13, label if len(label) <= 34 else label[:33] + "…"))
        x = label_w
        for name, value in row.parts:
            if value <= 0:
                continue
            width = plot_w * value / scale
            body.append(rect(x, y, width, bar_h, MEMORY_COLOURS[name], f"{name}: {fmt.nbytes(value)}",
                             data_rank=rank))
            x += width
        share = row.total_bytes / view.capacity_bytes
        body.append(text(x + 4, y + 13, f"{fmt.nbytes(row.total_bytes)} ({100 * share:.0f} %)"))
        y += bar_h + gap
    cap_x = label_w + plot_w * view.capacity_bytes / scale
    body.append(f'<line class="cap" x1="{cap_x:.1f}" y1="4" x2="{cap_x:.1f}" y2="{y:.1f}"/>')
    body.append(text(cap_x, 12, f"capacity {fmt.nbytes(view.capacity_bytes)}", "middle"))
    return svg(WIDTH, y + 4, body, "memory per device against capacity")


def breakdown_bar(plan: Plan) -> str:
    parts, total = plan.predicted.breakdown_dict(), plan.predicted.step_time_s
    if not parts or not total:
        return '<p class="note">the plan predicts no step-time breakdown</p>'
    body, x = [], 0.0
    scale = (WIDTH - 8) / max(total, sum(parts.values()))
    for key in BREAKDOWN_KEYS:
        if parts.get(key):
            width = parts[key] * scale
            body.append(rect(4 + x, 4, width, 26, BREAKDOWN_COLOURS[key],
                             f"{key}: {fmt.seconds(parts[key])} ({100 * parts[key] / total:.1f} %)"))
            x += width
    return svg(WIDTH, 34, body, "step time breakdown")


def legend(items: list[tuple[str, str]]) -> str:
    spans = "".join(f'<span><i style="background:{esc(colour)}"></i>{esc(name)}</span>'
                    for name, colour in items)
    return f'<div class="legend">{spans}</div>'

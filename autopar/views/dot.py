"""A Graphviz view of a plan (``autopar show plan.json --format dot | dot -Tsvg``).

Data flow: :class:`~autopar.views.model.PlanView` → :func:`render_dot` → DOT text: one box per
pipeline stage (layers, devices, recomputation, memory per device), grouped by pipeline rank,
with an edge for each point-to-point send between consecutive stages. Labels from the plan are
escaped for DOT's quoted strings.
"""

from __future__ import annotations

from autopar import fmt
from autopar.views.assets import rank_colour
from autopar.views.model import PlanView
from autopar.views.text import describe_config


def quote(value: object) -> str:
    """A DOT quoted string: backslashes, quotes and newlines escaped."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n")
    return f'"{text}"'


def render_dot(view: PlanView) -> str:
    plan = view.plan
    config = describe_config(plan.parallelism, plan.schedule, plan.zero)
    title = f"{plan.model} on {plan.cluster['text']}: {config}"
    lines = ["digraph plan {",
             f"  graph [rankdir=LR, fontname=Helvetica, labelloc=t, label={quote(title)}];",
             "  node [shape=box, style=\"rounded,filled\", fontname=Helvetica, fontsize=10];",
             "  edge [fontname=Helvetica, fontsize=9];"]
    memory = {d: row for row in view.memory for d in row.devices}
    for rank in range(plan.parallelism.pp):
        mine = [s for s in view.stages if s.rank == rank]
        devices = fmt.id_ranges(mine[0].devices) if mine else ""
        lines.append(f"  subgraph cluster_rank{rank} {{")
        lines.append(f"    label={quote(f'pipeline rank {rank} · devices {devices}')}; color=gray;")
        for stage in mine:
            mem = memory.get(stage.devices[0])
            label = "\n".join([
                f"stage {stage.index}",
                f"layers {stage.span}" if stage.num_layers else "no layers",
                f"recompute {stage.recompute}",
                *([f"{fmt.nbytes(mem.total_bytes)} / device"] if mem else []),
            ])
            colour = quote(rank_colour(stage.rank))
            lines.append(f"    s{stage.index} [label={quote(label)}, fillcolor={colour}];")
        lines.append("  }")
    for a, b in zip(view.stages, view.stages[1:], strict=False):
        send = a.times.send_forward_s if a.times else None
        label = f" [label={quote(fmt.seconds(send))}]" if send else ""
        lines.append(f"  s{a.index} -> s{b.index}{label};")
    lines.append("}")
    return "\n".join(lines) + "\n"

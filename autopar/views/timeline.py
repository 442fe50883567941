"""The pipeline timeline of the HTML report: one row per pipeline rank, one box per event.

Data flow: ``PlanView.timeline`` (``cost_models.simulate_predicted``'s events on the stage times the
plan stores: forward, backward, weight gradient, recomputation, send, receive; idle is the row's
background) → :func:`timeline_svg`
→ an SVG string in ``views.html``. The drawing fits the page unless that leaves under 1.5 px
per action; then it grows and scrolls horizontally. After the pipeline part it marks the
step's data-parallel sync and optimizer time from ``plan.predicted.breakdown``.

Size: events are drawn as one ``<path>`` per (rank, stage, kind), ~25 bytes each. Beyond
:data:`MAX_EVENTS` (a 3,072-GPU plan simulates ~400,000) the timeline shows the start of the
step (warm-up) and its end (cool-down) exactly, with the repetitive steady state between them
cut out and labelled, so a report stays well under 2 MB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autopar import fmt
from autopar.cost_models import TimelineEvent
from autopar.views.assets import KIND_COLOURS
from autopar.views.model import PlanView
from autopar.views.svg import esc, rect, svg, text

LABEL_W, ROW_H, GAP_W, MIN_W, MAX_W, PX_PER_ACTION = 150, 22, 40, 1050, 9000, 1.5
MAX_EVENTS = 24_000
TAIL_COLOUR = "#9c755f"
NAMES = {"forward": "forward", "backward": "backward", "backward_weight": "weight gradient (zero bubble)",
         "recompute": "recompute", "send": "send (P2P)", "recv": "receive wait"}


@dataclass(frozen=True)
class _Axis:
    """Seconds → x over one or two windows of the step, one scale, a gap between windows."""

    windows: tuple[tuple[float, float], ...]
    scale: float

    def spans(self, start: float, end: float) -> list[tuple[float, float]]:
        """(x, width) of the parts of [start, end) inside the windows."""
        out, x0 = [], LABEL_W
        for a, b in self.windows:
            lo, hi = max(start, a), min(end, b)
            if hi > lo:
                out.append((x0 + (lo - a) * self.scale, (hi - lo) * self.scale))
            x0 += (b - a) * self.scale + GAP_W
        return out

    @property
    def width(self) -> float:
        return sum(b - a for a, b in self.windows) * self.scale + GAP_W * (len(self.windows) - 1)


def _windows(events: list[TimelineEvent], total_s: float) -> tuple[tuple[float, float], ...]:
    if len(events) <= MAX_EVENTS:
        return ((0.0, total_s),)
    half = MAX_EVENTS // 2
    cut_start = sorted(e.start_s for e in events)[half]
    cut_end = sorted(e.end_s for e in events)[-half]
    return ((0.0, total_s),) if cut_start >= cut_end else ((0.0, cut_start), (cut_end, total_s))


def _ticks(a: float, b: float, span_s: float, count: int = 8) -> list[float]:
    raw = span_s / count
    if raw <= 0:
        return [a]
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(a / step), int(b / step) + 1)]


def _event_paths(events: list[TimelineEvent], axis: _Axis) -> list[str]:
    """One ``<path>`` per (rank, stage, kind); its tooltip sums up the events it draws."""
    groups: dict[tuple[int, int | None, str], list[TimelineEvent]] = {}
    for event in events:
        groups.setdefault((event.rank, event.stage, event.kind), []).append(event)
    paths = []
    for (rank, stage, kind), mine in groups.items():
        y, h = 20 + rank * ROW_H, ROW_H - 4
        d = "".join(f"M{x:.1f} {y}h{w:.2f}v{h}h{-w:.2f}z"
                    for e in mine for x, w in axis.spans(e.start_s, e.end_s))
        if not d:
            continue
        seconds = sum(e.end_s - e.start_s for e in mine)
        where = "" if stage is None else f" · stage {stage}"
        title = (f"rank {rank}{where} · {NAMES.get(kind, kind)}: {len(mine)} × "
                 f"{fmt.seconds(seconds / len(mine))} = {fmt.seconds(seconds)}")
        paths.append(f'<path d="{d}" fill="{KIND_COLOURS.get(kind, "#999")}" data-rank="{rank}">'
                     f"<title>{esc(title)}</title></path>")
    return paths


def timeline_svg(view: PlanView) -> str:
    timeline = view.timeline
    if timeline is None or not timeline.events:
        return '<p class="note">no pipeline timeline: the plan predicts no step-time breakdown</p>'
    parts = view.plan.predicted.breakdown_dict()
    tail_s = parts.get("dp_comm", 0.0) + parts.get("optimizer", 0.0)
    total = timeline.total_s + tail_s
    events = [e for e in timeline.events if e.kind != "idle"]
    windows = _windows(events, total)
    shown_s = sum(b - a for a, b in windows)
    drawn = [e for e in events if any(e.start_s < b and e.end_s > a for a, b in windows)]
    actions = sum(e.kind in ("forward", "backward", "backward_weight") for e in drawn)
    plot_w = max(MIN_W - LABEL_W, min(MAX_W, PX_PER_ACTION * actions / max(1, timeline.num_ranks)))
    axis = _Axis(windows, (plot_w - GAP_W * (len(windows) - 1)) / shown_s if shown_s > 0 else 0.0)
    body: list[str] = []
    for rank in range(timeline.num_ranks):
        y = 20 + rank * ROW_H
        mine = [str(s.index) for s in view.stages if s.rank == rank]
        label = f"rank {rank} · stage{'s' if len(mine) > 1 else ''} " + ",".join(mine)
        body.append(text(4, y + 14, label if len(label) <= 24 else label[:23] + "…"))
        body += [rect(x, y, w, ROW_H - 4, "#eeeeee", f"rank {rank}: idle")
                 for x, w in axis.spans(0, timeline.total_s)]
    body += _event_paths(drawn, axis)
    bottom = 20 + timeline.num_ranks * ROW_H
    tail = f"data-parallel sync + optimizer: {fmt.seconds(tail_s)}"
    body += [rect(x, 20, w, bottom - 24, TAIL_COLOUR, tail, opacity="0.6")
             for x, w in axis.spans(timeline.total_s, total)]
    x0 = LABEL_W
    for index, (a, b) in enumerate(windows):
        end = x0 + (b - a) * axis.scale
        body.append(f'<line class="axis" x1="{x0:.1f}" y1="{bottom}" x2="{end:.1f}" y2="{bottom}"/>')
        for tick in _ticks(a, b, shown_s):
            x = x0 + (tick - a) * axis.scale
            body.append(f'<line class="axis" x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}"/>')
            body.append(text(x, bottom + 16, fmt.seconds(tick), "middle"))
        if index + 1 < len(windows):
            cut = windows[index + 1][0] - b
            body.append(rect(end + 4, 16, GAP_W - 8, bottom - 16, "#ffffff",
                             f"{fmt.seconds(cut)} of the steady state not drawn", stroke="#999",
                             stroke_dasharray="3 3"))
            body.append(text(end + GAP_W / 2, bottom + 16, "…", "middle"))
        x0 = end + GAP_W
    caption = f"simulated step: pipeline {fmt.seconds(timeline.total_s)}" + (
        f" + DP sync and optimizer {fmt.seconds(tail_s)}" if tail_s else "")
    if len(windows) > 1:
        caption += (f"; {len(drawn):,} of {len(events):,} events drawn: the steady state between "
                    f"{fmt.seconds(windows[0][1])} and {fmt.seconds(windows[1][0])} is cut out")
    body.append(text(LABEL_W, 12, caption))
    return svg(LABEL_W + axis.width + 20, bottom + 24, body, "pipeline timeline per rank")


def timeline_legend() -> list[tuple[str, str]]:
    return [(NAMES[k], c) for k, c in KIND_COLOURS.items()] + [("idle", "#eeeeee"),
                                                              ("DP sync + optimizer", TAIL_COLOUR)]

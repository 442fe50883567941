"""Plots of a sweep's rows (matplotlib, Agg backend), written atomically as PNG and SVG.

Data flow: ``driver.run_suite`` → :func:`draw` (suite name, rows) → the suite's figure, or
nothing for suites without one. ``planner-scaling``: search time vs layers and vs GPUs;
``plan-quality``: autopar's predicted speed-up over Megatron-LM's configuration per row;
``runtime-cpu``: predicted and measured step time of every candidate per world size;
``passes``: measured and predicted random-LTD savings against the keep ratio.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _ok(rows: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok" and r.get("search_s") is not None
            and all(r["params"].get(k) == v for k, v in match.items())]


def planner_scaling(rows: list[dict[str, Any]]) -> Figure:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    depth = sorted(_ok(rows, axis="depth"), key=lambda r: r["layers"])
    left.plot([r["layers"] for r in depth], [r["search_s"] for r in depth], "o-")
    left.set(xlabel="layers (GPT h4096, 256 A100, batch 512)", ylabel="search time (s)",
             title="Planning time vs depth")
    gpus = sorted(_ok(rows, axis="gpus"), key=lambda r: r["gpus"])
    infeasible = [r for r in gpus if r.get("configs") is None]
    right.plot([r["gpus"] for r in gpus], [r["search_s"] for r in gpus], "o-", label="all")
    right.plot([r["gpus"] for r in infeasible], [r["search_s"] for r in infeasible],
               "x", color="red", markersize=10, label="proved infeasible")
    right.set(xscale="log", xlabel="GPUs (GPT-3 175B, batch 1536)", ylabel="search time (s)",
              title="Planning time vs cluster size")
    right.legend()
    for axes in (left, right):
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
    return fig


def plan_quality(rows: list[dict[str, Any]]) -> Figure:
    ok = [r for r in rows if r.get("status") == "ok"]
    fig, axes = plt.subplots(figsize=(10, 4), constrained_layout=True)
    labels = [f"{r['model'].removeprefix('megatron-')}\n{r['gpus']} GPUs" for r in ok]
    axes.bar(labels, [r["speedup"] for r in ok])
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set(ylabel="predicted speed-up (Megatron step / autopar step)",
             title="autopar's plan vs Megatron-LM's published configuration (same cost model)")
    axes.grid(axis="y", alpha=0.3)
    return fig


def _entries(row: dict[str, Any]) -> tuple[str, list[tuple[str, float, float]]]:
    """(panel title, [(label, predicted s, measured s)]) of a runtime-cpu row."""
    if row.get("candidates"):
        return (f"{row['world_size']} ranks: autopar's choice (*) vs its best per dp×tp×pp",
                [(("* " if c["chosen"] else "") + " ".join(c["plan"].split()[:3]), c["predicted_s"],
                  c["measured_s"]) for c in row["candidates"]])
    return (f"{row['world_size']} rank(s): autopar vs hand-written plans",
            [(c["choice"], c["predicted_s"], c["measured_s"]) for c in row["choices"]])


def runtime_cpu(rows: list[dict[str, Any]]) -> Figure:
    panels_data = [_entries(r) for r in rows
                   if r.get("status") == "ok" and (r.get("candidates") or r.get("choices"))]
    count = max(1, len(panels_data))
    fig, panels = plt.subplots(1, count, figsize=(5 * count, 4.5), constrained_layout=True, squeeze=False)
    for axes, (title, entries) in zip(panels[0], panels_data, strict=False):
        x = range(len(entries))
        axes.bar([i - 0.2 for i in x], [e[1] for e in entries], 0.4, label="predicted")
        axes.bar([i + 0.2 for i in x], [e[2] for e in entries], 0.4, label="measured")
        axes.set_xticks(list(x), [e[0] for e in entries], rotation=30, ha="right", fontsize=7)
        axes.set(ylabel="step time (s)")
        axes.set_title(title, fontsize=9)
        axes.legend(fontsize=8)
        axes.grid(axis="y", alpha=0.3)
    return fig


def passes(rows: list[dict[str, Any]]) -> Figure:
    ok = sorted((r for r in rows if r.get("status") == "ok" and "kept_ratio" in r),
                key=lambda r: r["kept_ratio"])
    fig, axes = plt.subplots(figsize=(6, 4), constrained_layout=True)
    ratios = [r["kept_ratio"] for r in ok]
    for key, label in (("measured_saving", "measured"), ("predicted_saving_estimate", "cost model"),
                       ("predicted_saving_flops", "FLOP ratio")):
        axes.plot(ratios, [100 * r[key] for r in ok], "o-", label=label)
    axes.set(xlabel="kept fraction on the middle layers", ylabel="step-time saving (%)",
             title="Random-LTD: saving vs keep ratio (CPU)")
    axes.legend()
    axes.grid(alpha=0.3)
    return fig


FIGURES: dict[str, Callable[[list[dict[str, Any]]], Figure]] = {
    "planner-scaling": planner_scaling, "plan-quality": plan_quality, "runtime-cpu": runtime_cpu,
    "passes": passes,
}


def _save(fig: Figure, path: Path) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(handle)
    fig.savefig(tmp, dpi=120, metadata={"Date": None} if path.suffix == ".svg" else None)
    os.replace(tmp, path)


def draw(name: str, rows: list[dict[str, Any]], out: Path) -> tuple[Path, ...]:
    """Write ``<out>/<name>.png`` and ``.svg`` when the suite has a figure; the paths written."""
    if name not in FIGURES or not any(r.get("status") == "ok" for r in rows):
        return ()
    fig = FIGURES[name](rows)
    paths = (out / f"{name}.png", out / f"{name}.svg")
    try:
        for path in paths:
            _save(fig, path)
    finally:
        plt.close(fig)
    return paths

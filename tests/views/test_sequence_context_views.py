"""show, HTML, diff and explain of plans with context and sequence parallelism: the degrees line,
the mesh's cp axis, the ring's share of the breakdown and the reasons."""

from __future__ import annotations

import dataclasses

from rich.console import Console

from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import ModelProfile, estimate_plan
from autopar.models import get_config
from autopar.plans.pinned import plan_from_fix
from autopar.views import build_view
from autopar.views.diff import compare, render_diff
from autopar.views.explain import explain_plan
from autopar.views.html import render_html
from autopar.views.text import render

SEQ = 32_768


def _plan(**fix: object):
    config = get_config("gpt", num_layers=8, hidden_size=2048, num_heads=16, vocab_size=32_000, seq_len=SEQ)
    profile = ModelProfile.gpt(config, name="long-gpt")
    plan = plan_from_fix("long-gpt", graph_fingerprint="analytic", num_layers=8, global_batch_size=4,
                         seq_len=SEQ, cluster=ClusterSpec.parse("1x8xH100-80GB"), fix=Fix(**fix))
    return estimate_plan(plan, profile)


def _printed(renderable, width: int = 120) -> str:
    console = Console(width=width, no_color=True, record=True)
    console.print(renderable)
    return " ".join(console.export_text().split())


def test_show_names_cp_and_sequence_parallelism_and_the_ring():
    plan = _plan(cp=2, tp=2, dp=2, sequence_parallel=True)
    assert plan.predicted.breakdown_dict()["cp_comm"] > 0
    text = _printed(render(build_view(plan, timeline=False)))
    assert "dp2 tp2 sp pp1 cp2" in text
    assert "pp 1 × dp 2 × cp 2 × tp 2" in text
    assert "CP ring" in text
    html = render_html(build_view(plan))
    assert "dp2 tp2 sp pp1 cp2" in html and "CP ring" in html


def test_diff_shows_the_cp_degree_and_sequence_parallelism():
    a = _plan(tp=2, dp=4)
    b = _plan(cp=2, tp=2, dp=2, sequence_parallel=True)
    rows = {r.what: r for r in compare(a, b) if r.changed}
    assert rows["cp"].change == "×2" and rows["dp"].change == "÷2"
    assert (rows["sequence parallelism"].a, rows["sequence parallelism"].b) == ("off", "on")
    text = _printed(render_diff(a, b, names=("a.json", "b.json")))
    assert "cp 1 2 ×2" in text and "sequence parallelism off on" in text


def test_explain_says_what_cp_and_sequence_parallelism_do():
    on = _printed(explain_plan(build_view(_plan(cp=2, tp=2, dp=2, sequence_parallel=True))))
    assert "sequence parallelism on" in on and "reduce-scatter" in on
    assert f"cp 2: each {SEQ:,}-token sequence split over 2 ranks in 4 load-balanced causal chunks" in on
    assert "exposed transfers (" in on  # the ring's seconds and share of the step
    off = _printed(explain_plan(build_view(dataclasses.replace(_plan(tp=2, dp=4)))))
    assert "sequence parallelism off" in off and "cp 1: every device holds whole" in off

"""diff, explain, name lookup, DOT and the JSON summary."""

import dataclasses
import json

import pytest
from rich.console import Console
from view_plans import XSS, hostile_plan, rich_plan, version_1, zoo_plan

from autopar.plans import Sharding
from autopar.views import build_view
from autopar.views.diff import compare, render_diff
from autopar.views.dot import quote, render_dot
from autopar.views.explain import explain_plan, explain_target
from autopar.views.names import fold, lookup
from autopar.views.summary import summary


def printed(renderable, width=100):
    console = Console(width=width, no_color=True, record=True)
    console.print(renderable)
    return " ".join(console.export_text().split())


def test_diff_names_each_change_and_its_size():
    a, b = zoo_plan(tp=2, pp=2), zoo_plan(tp=4, pp=1, schedule="gpipe")
    rows = {r.what: r for r in compare(a, b) if r.changed}
    assert rows["tp"].change == "×2" and rows["pp"].change == "÷2" and "dp" not in rows
    assert rows["schedule"].a == "1f1b" and rows["schedule"].b == "gpipe"
    assert rows["layers per stage"].a == "12×2" and rows["layers per stage"].b == "24"
    assert rows["step time"].change.startswith(("+", "−")) and "%" in rows["step time"].change
    assert rows["MFU"].change.endswith("pts")
    text = printed(render_diff(a, b, names=("a.json", "b.json")))
    assert "a = a.json" in text and "tp 2 4 ×2" in text and "compared fields unchanged" in text


def test_diff_shows_what_the_plans_store_per_stage():
    a, b = zoo_plan(), version_1(zoo_plan())
    rows = {r.what: r for r in compare(a, b) if r.changed}
    assert rows["priced in"].a == "bf16" and rows["priced in"].b == "—"
    assert rows["slowest stage / microbatch"].b == "—" and "cost options" in rows
    assert "dp_overlap 1, tp_overlap 0" in rows["cost options"].a  # the defaults


def test_diff_of_equal_plans():
    plan = rich_plan()
    assert "identical" in printed(render_diff(plan, plan))
    newer = dataclasses.replace(plan, created_by="autopar 9.9")
    assert "differ only in fields not compared" in printed(render_diff(plan, newer))


def test_explain_gives_computed_reasons():
    text = printed(explain_plan(build_view(rich_plan())))
    for expected in ("tp 2: each layer's matmuls split over 2 devices inside a node",
                     "pp 2: 24 layers in 2 stages", "dp 4", "memory does not bind", "stage balance",
                     "stage 1 recomputes (full): without it its devices would need", "column-parallel",
                     "row-parallel", "blocks_*_attn_qkv", "alternatives considered (top 2 of 2)",
                     "communication per microbatch on the busiest stage", "tensor-parallel"):
        assert expected in text, expected


def test_explain_binding_memory():
    plan = rich_plan()
    peak = max(plan.predicted.peak_memory_bytes)
    device = dict(plan.cluster["device"], memory_bytes=int(peak * 1.02))
    tight = dataclasses.replace(plan, cluster=dict(plan.cluster, device=device), model="MyNet")
    text = printed(explain_plan(build_view(tight)))
    assert "memory binds: devices" in text and "recomputes (full): without it its devices would need" in text
    assert "which would fit in the" in text and "approximate" not in text
    text = printed(explain_plan(build_view(version_1(tight))))
    assert "the planner's memory model needed it" in text and "approximated from the plan's totals" in text


@pytest.mark.parametrize("query, layer, nodes", [
    ("7", 7, 0), ("layer 7", 7, 0), ("blocks.7", 7, 2), ("blocks.7.attn.qkv", 7, 1),
    ("blocks_7_attn_qkv", 7, 1), ("blocks_7_attn", 7, 2),
])
def test_lookup(query, layer, nodes):
    match = lookup(rich_plan(), query)
    assert match.layer == layer and len(match.shardings) == nodes


@pytest.mark.parametrize("query, message", [
    ("99", "out of range"), ("blocks.7.attn.qkvx", "closest: blocks_7_attn_qkv"),
    ("zzz", "try a layer index"),
])
def test_lookup_errors(query, message):
    with pytest.raises(ValueError, match=message):
        lookup(rich_plan(), query)


def test_explain_one_target():
    view = build_view(rich_plan())
    text = printed(explain_target(view, "blocks.13.attn.proj"))
    assert "layer 13 runs in stage 1" in text and "recomputes (full)" in text
    assert "communication: tensor-parallel" in text and "(approximate)" not in text
    assert "blocks_13_attn_proj: rowwise" in text and "all-reduce" in text


def test_fold_groups_repeated_layers():
    folded = fold(rich_plan().shardings + (Sharding(node="lm_head", strategy="colwise"),))
    assert [(f.pattern, f.strategy, len(f.numbers)) for f in folded] == [
        ("blocks_*_attn_qkv", "colwise", 24), ("blocks_*_attn_proj", "rowwise", 24),
        ("lm_head", "colwise", 0)]


def test_dot_escapes_and_groups_ranks():
    dot = render_dot(build_view(hostile_plan()))
    assert dot.startswith("digraph plan {") and dot.rstrip().endswith("}")
    assert "subgraph cluster_rank0" in dot and "s0 -> s1" in dot
    assert quote('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    assert dot.count('"') % 2 == 0


def test_json_summary_is_complete_and_plain():
    data = json.loads(json.dumps(summary(build_view(rich_plan()))))
    assert data["per_stage_numbers"] == "cost model" and len(data["stages"]) == 2 and data["dtype"] == "bf16"
    assert data["stages"][0]["tp_comm_s"] > 0 and data["stages"][0]["pp_comm_s"] > 0
    assert data["stages"][1]["recompute"] == "full" and data["stages"][1]["recompute_s"] > 0
    assert data["parallelism"] == {"cp": 1, "dp": 4, "ep": 1, "pp": 2, "sequence_parallel": False, "tp": 2}
    assert data["timeline_s"] > 0 and len(data["alternatives"]) == 2
    assert data["passes"][0]["name"] == "fused_attention"
    assert summary(build_view(hostile_plan()))["model"] == XSS  # JSON carries the raw string

"""The HTML report, read as text: self-contained, escaped, deterministic, small."""

import base64
import hashlib
import re

import pytest
from view_plans import XSS, hostile_plan, rich_plan, version_1, zoo_plan

from autopar.cost_models import megatron_plan
from autopar.plans import Plan
from autopar.views import build_view
from autopar.views.assets import CSP, JS
from autopar.views.html import render_html

SECTIONS = ("mesh", "layers", "timeline", "memory", "breakdown", "alternatives", "passes", "shardings")


def test_every_section_is_there():
    html = render_html(build_view(rich_plan()))
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    for section in SECTIONS:
        assert f'<section id="{section}">' in html
    assert html.count("<svg") == 5  # mesh, layer map, timeline, memory, breakdown
    assert html.count('data-rank="0"') > 10 and "capacity" in html
    for part in ("weights", "gradients", "optimizer states", "activations", "reserve"):
        assert f"{part}: " in html, part  # a memory bar's tooltip
    assert "TP " in html and "P2P " in html  # communication per stage
    assert "stage times the cost model stored in the plan" in html and "approximated" not in html
    assert "dp8 tp1 pp2" in html and "fused_attention" in html and "blocks_*_attn_qkv" in html
    assert "recompute" in html and "weight gradient" not in html.split('<section id="timeline">')[1][:50]


def test_no_network_anywhere():
    html = render_html(build_view(rich_plan()))
    assert not re.search(r"(src|href|action|srcset)\s*=", html, re.IGNORECASE)
    assert "url(" not in html and "@import" not in html and "<link" not in html and "<iframe" not in html
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) == {"http://www.w3.org/2000/svg"}
    assert "default-src 'none'" in CSP
    digest = base64.b64encode(hashlib.sha256(JS.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in CSP and f"<script>{JS}</script>" in html and html.count("<script") == 1


def test_model_strings_are_escaped():
    html = render_html(build_view(hostile_plan()))
    assert XSS not in html and "<img" not in html and "<b>fp</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html and "&lt;/script&gt;" in html
    assert "a&quot;b\\c" in html


def test_deterministic():
    plan = rich_plan()
    assert render_html(build_view(plan)) == render_html(build_view(plan))


@pytest.mark.parametrize("schedule", ["gpipe", "zero_bubble", "interleaved"])
def test_every_schedule_draws_a_timeline(schedule):
    html = render_html(build_view(zoo_plan(schedule=schedule)))
    timeline = html.split('<section id="timeline">')[1].split("</section>")[0]
    assert "<svg" in timeline and timeline.count("<path") >= 4
    assert ("weight gradient (zero bubble): " in timeline) == (schedule == "zero_bubble")


def test_a_thousand_gpu_report_stays_small():
    """Megatron's 1T row: 3,072 GPUs, pp 64, interleaved — the largest layout in the zoo."""
    from autopar.cost_models import ModelProfile, estimate_plan
    from autopar.models import get_config

    plan = megatron_plan("megatron-1t", num_gpus=3072, tp=8, pp=64, global_batch_size=3072)
    plan = estimate_plan(plan, ModelProfile.gpt(get_config("megatron-1t"), name="megatron-1t"))
    html = render_html(build_view(plan))
    assert len(html.encode()) < 2 * 2**20


def test_an_older_plan_file_renders_approximately_and_says_so():
    html = render_html(build_view(Plan.from_json(version_1(rich_plan()).to_json())))
    assert "approximated from the plan&#x27;s totals" in html and "peak: " in html and "<svg" in html


def test_a_plan_without_predictions_renders_everywhere():
    from rich.console import Console

    from autopar.cluster import ClusterSpec
    from autopar.plans import Plan
    from autopar.views.dot import render_dot
    from autopar.views.explain import explain_plan
    from autopar.views.summary import render_json
    from autopar.views.text import render

    bare = Plan.single_device("tiny", graph_fingerprint="x", cluster=ClusterSpec.parse("local:1"),
                              global_batch_size=2)
    view = build_view(bare)
    html = render_html(view)
    assert "no pipeline timeline" in html and "the plan predicts no memory" in html
    console = Console(width=100, record=True)
    console.print(render(view), explain_plan(view))
    assert "step time    —" in console.export_text()
    assert render_dot(view).startswith("digraph") and '"timeline_s": null' in render_json(view)

"""The terminal view: every section, 80 and 100 columns, no colour, markup-proof."""

import dataclasses

import pytest
from rich.console import Console
from view_plans import XSS, hostile_plan, rich_plan, version_1, zoo_plan

from autopar.views import build_view
from autopar.views.text import bar, describe_config, render


def printed(plan, width=100):
    console = Console(width=width, no_color=True, record=True, force_terminal=False)
    console.print(render(build_view(plan, timeline=False), width=width))
    return console.export_text()


@pytest.mark.parametrize("width", [80, 100])
def test_sections_fit_the_terminal(width):
    text = printed(rich_plan(), width)
    assert max(map(len, text.splitlines())) <= width
    for expected in ("plan · gpt3-1.3b", "16 × A100-80GB", "dp4 tp2 pp2 · 1f1b b1×m16", "tokens/s", "MFU",
                     "pipeline stages", "0–11", "12–23", "0–7", "8–15", "full", "predicted step time",
                     "compute", "recompute", "bubble", "alternatives considered (top 2 of 2)",
                     "dp8 tp1 pp2 · 1f1b b1×m8", "+10.0 %", "graph passes: fused_attention (causal=True)",
                     "comm", "per-stage numbers: the cost model's, stored in the plan (bf16 training)"):
        assert expected in " ".join(text.split()), expected
    assert "…" not in text  # nothing truncated
    assert ("of capacity" in text) == (width >= 90)  # memory bars only where they fit


def test_interleaved_plans_fold_stages_by_rank():
    text = printed(zoo_plan(schedule="interleaved", virtual_stages=3))
    assert "rank r runs stages r, r+2" in text and "0…4" in text and "12 (3×4)" in text


def test_plan_strings_are_not_rich_markup():
    text = printed(hostile_plan())
    assert XSS in text and "[red]markup[/red]" in text
    assert "approximated" not in text  # a model that is no zoo name still has its stored numbers


def test_an_older_plan_file_says_its_numbers_are_approximate():
    text = " ".join(printed(version_1(rich_plan())).split())
    assert "times approximated from totals" in text and "re-plan with `autopar plan`" in text


def test_bars_and_config_descriptions():
    assert bar(5, 10, 10) == "█████░░░░░" and bar(20, 10, 4) == "████!" and bar(1, 0, 3) == "   "
    plan = zoo_plan(schedule="interleaved", virtual_stages=3)
    plan = dataclasses.replace(plan, zero=1)
    text = describe_config(plan.parallelism, plan.schedule, plan.zero)
    assert text == "dp4 tp2 pp2 · interleaved b1×m16 v3 zero1"

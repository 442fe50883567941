"""The sweep driver: the smoke suite runs, writes one row per case and resumes; bad suites fail clearly."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from autopar.cli.main import main  # noqa: E402
from benchmarks.sweep.cases import SUITES, Case, suite  # noqa: E402
from benchmarks.sweep.driver import run_suite  # noqa: E402


def test_smoke_suite_runs_writes_one_row_per_case_and_resumes(tmp_path: Path) -> None:
    cases = suite("smoke")
    first = run_suite("smoke", out=tmp_path, show_progress=False)
    assert first.failed == 0 and first.resumed == 0
    assert first.ran + first.skipped == len(cases)
    rows = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert [r["case"] for r in rows] == [c.name for c in cases]
    assert all(r["environment"]["autopar_commit"] is not None and "triton" in r["environment"] for r in rows)
    with (tmp_path / "smoke.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["case"] for r in table] == [c.name for c in cases]
    assert {"search_s", "step_s", "elapsed_s"} <= table[0].keys()
    assert "# Sweep `smoke`" in (tmp_path / "smoke.md").read_text()
    before = (tmp_path / "smoke.jsonl").read_text()
    second = run_suite("smoke", out=tmp_path, show_progress=False)
    assert second.ran == 0 and second.resumed == first.ran
    assert (tmp_path / "smoke.jsonl").read_text() == before


def test_kinds_of_smoke_and_kernel_skip_without_gpu() -> None:
    kinds = {c.kind for c in suite("smoke")}
    assert {"planner", "plan-quality", "plan-local", "random-ltd", "kernel"} <= kinds
    assert "runtime" not in kinds  # smoke spawns no processes
    kernel = next(c for c in suite("smoke") if c.kind == "kernel")
    assert isinstance(kernel, Case)
    import torch
    assert (kernel.skip_reason is None) == torch.cuda.is_available()


def test_suites_are_named_and_unknown_one_lists_them() -> None:
    assert set(SUITES) == {"planner-scaling", "plan-quality", "runtime-cpu", "passes", "kernels", "smoke"}
    assert len(suite("plan-quality")) == 10 and len(suite("runtime-cpu")) == 5
    with pytest.raises(ValueError, match="valid suites: planner-scaling"):
        suite("nope")


def test_cli_unknown_suite_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--suite", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown suite 'nope'" in err and "smoke" in err


def test_passes_suite_and_the_measured_suites_plots(tmp_path):
    from benchmarks.sweep import plots

    cases = suite("passes")
    assert [c.params["keep_ratio"] for c in cases if c.kind == "random-ltd"] == [0.75, 0.5, 0.25]
    assert [(c.params["num_experts"], c.params["top_k"]) for c in cases if c.kind == "moe"] == [
        (4, 2), (8, 1), (8, 2), (16, 2)]
    ltd_rows = [{"status": "ok", "kept_ratio": r, "measured_saving": 0.4 * (1 - r), "params": {},
                 "predicted_saving_estimate": 0.45 * (1 - r), "predicted_saving_flops": 0.5 * (1 - r)}
                for r in (0.75, 0.5)]
    candidate = {"plan": "dp2 tp1 pp1 gpipe", "predicted_s": 0.4, "measured_s": 0.45, "chosen": True}
    hand = [{"choice": "autopar", "plan": "dp2", "predicted_s": 0.4, "measured_s": 0.45},
            {"choice": "pure data parallel", "plan": "dp2", "predicted_s": 0.4, "measured_s": 0.47}]
    runtime_rows = [{"status": "ok", "world_size": 2, "params": {}, "candidates": [candidate]},
                    {"status": "ok", "world_size": 2, "params": {}, "choices": hand}]
    for name, rows in (("passes", ltd_rows), ("runtime-cpu", runtime_rows)):
        written = plots.draw(name, rows, tmp_path)
        assert [p.name for p in written] == [f"{name}.png", f"{name}.svg"]
        assert all(p.stat().st_size > 1000 for p in written)

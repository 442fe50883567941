"""``make gpu-check``: the dry run lists what it would measure; the measuring code runs on CPU for one
tiny plan (everything but the CUDA calls); the deadline, a failing item and a command past its budget
are recorded and the check goes on. On a GPU, the CUDA memory-by-category branch is checked too."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

import autopar
from benchmarks import gpu_check
from benchmarks.gpu_check import Item, device_cluster, gpu_runs, main, run_command, run_items

ROOT = Path(__file__).parents[2]


def test_dry_run_lists_every_item_with_its_settings_and_writes_nothing(tmp_path, capsys):
    assert main(["--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "nothing measured" in out
    names = ["autopar calibrate", *(r.name for r in gpu_runs()), "attention seq 1024", "attention seq 4096"]
    for name in names:
        assert name in out
    assert '"recompute": "full"' in out and '"fused_attention": true' in out and '"dtype": "bf16"' in out
    assert not list(tmp_path.iterdir())
    if not torch.cuda.is_available():  # what `make gpu-check` runs here: the same dry run
        assert main(["--out", str(tmp_path)]) == 0
        assert "dry run (no GPU)" in capsys.readouterr().out
        assert not list(tmp_path.iterdir())


def test_recorded_dry_run_says_not_measured(tmp_path):
    assert main(["--dry-run", "--write-dry-run", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "gpu_check.json").read_text())
    assert payload["status"] == "not measured (--dry-run)" and payload["items"] == []
    assert len(payload["planned"]) == 1 + len(gpu_runs()) + len(gpu_check.KERNEL_SEQS)
    text = (tmp_path / "gpu_check.md").read_text()
    assert "not measured" in text and "medium bf16 b8 full" in text
    assert not re.search(r"\d+\.\d+ (s|ms)\b", text)  # no figure where nothing was measured


def test_quick_cpu_run_measures_a_tiny_plan_through_the_public_path(tmp_path):
    assert main(["--device", "cpu", "--quick", "--steps", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "gpu_check.json").read_text())
    assert payload["status"] == "measured" and payload["environment"]["device"] == "CPU"
    (item,) = payload["items"]
    assert item["status"] == "ok", item.get("traceback_tail")
    assert item["executed"]["passes"] == ["fused_attention"] and item["executed"]["microbatch_size"] == 2
    assert item["measured_step_s"] > 0 and item["predicted_step_s"] > 0 and len(item["plain_steps_s"]) == 1
    model = autopar.models.build("gpt", seq_len=64, **gpu_check.TINY_GPT)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    memory = item["memory_bytes"]
    assert set(memory) == {"parameters", "gradients", "optimizer", "activations", "temporaries"}
    assert memory["parameters"]["measured"] == memory["gradients"]["measured"] == weights
    assert memory["activations"]["measured"] > 0 and memory["parameters"]["error_pct"] is not None
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| tiny fp32 b2 fused | gpt | 2 × 64 | fp32 | none → none | True |" in text
    assert "memory by category" in text


def test_deadline_skips_what_is_left_and_says_so(tmp_path):
    assert main(["--device", "cpu", "--quick", "--deadline-s", "0", "--out", str(tmp_path)]) == 0
    (item,) = json.loads((tmp_path / "gpu_check.json").read_text())["items"]
    assert item["status"] == "skipped" and "global deadline" in item["reason"]
    assert "skipped: global deadline" in (tmp_path / "gpu_check.md").read_text()


def test_a_failing_item_is_recorded_and_the_next_one_runs():
    def fails(budget_s: float) -> dict:
        raise ValueError("batch_size = 0 is invalid")

    seen: list[int] = []
    good = Item(kind="plan", name="good", settings={}, run=lambda s: {"budget_s": s}, min_s=0.0, budget_s=7.0)
    items = [Item(kind="plan", name="bad", settings={}, run=fails, min_s=0.0), good]
    records = run_items(items, deadline_s=60.0, on_record=lambda r: seen.append(len(r)))
    assert [r["status"] for r in records] == ["error", "ok"] and seen == [1, 2]
    assert records[0]["error"] == "ValueError: batch_size = 0 is invalid" and records[1]["budget_s"] == 7.0


def test_an_item_past_the_deadline_is_interrupted():
    item = Item(kind="kernel", name="slow", settings={}, run=lambda s: time.sleep(30) or {}, min_s=0.0)
    start = time.monotonic()
    (record,) = run_items([item], deadline_s=0.5, on_record=lambda r: None)
    assert time.monotonic() - start < 5
    assert record["status"] == "error" and record["error"].startswith("DeadlineExceeded")


def test_a_command_past_its_budget_is_stopped_and_a_failing_one_raises(tmp_path):
    start = time.monotonic()
    stopped = run_command([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                          budget_s=2.0)
    assert stopped["status"] == "stopped" and time.monotonic() - start < 10
    with pytest.raises(RuntimeError, match="exited with 3"):
        run_command([sys.executable, "-c", "raise SystemExit(3)"], budget_s=30.0)
    pid_file = tmp_path / "pid"
    sleeper = [sys.executable, "-c",
               f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"]
    item = Item(kind="calibration", name="sleeper", settings={}, min_s=0.0,
                run=lambda s: run_command(sleeper, budget_s=s), budget_s=60.0)
    start = time.monotonic()
    (record,) = run_items([item], deadline_s=2.0, on_record=lambda r: None)  # the alarm comes first
    assert record["error"].startswith("DeadlineExceeded") and time.monotonic() - start < 10
    with pytest.raises(ProcessLookupError):  # the command did not outlive the check
        os.kill(int(pid_file.read_text()), 0)


def test_gpu_names_map_to_catalog_clusters():
    assert device_cluster("NVIDIA H100 80GB HBM3") == "1xH100-80GB"
    assert device_cluster("NVIDIA H200") == "1xH200"
    with pytest.raises(ValueError, match="--cluster 1xNAME"):
        device_cluster("Tesla K80")


def test_make_gpu_check_target_runs_the_script_after_the_venv():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\.PHONY:.*\bgpu-check\b", makefile, re.MULTILINE)
    assert re.search(r"^gpu-check: \$\(STAMP\)\n\t\$\(BIN\)/python -m benchmarks\.gpu_check$", makefile,
                     re.MULTILINE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (memory from torch.cuda stats)")
def test_report_on_a_gpu_measures_memory_by_category_from_the_allocator():
    model = autopar.models.build("gpt", device="cuda", seq_len=64, **gpu_check.TINY_GPT)
    inputs, targets = autopar.models.example_batch(model, 2, seed=1)
    rank = autopar.compile(model, "1xH100").report(inputs, targets).ranks[0]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    memory = rank.measured.memory_bytes
    assert memory["parameters"] >= weights and memory["parameters"] < 1.01 * weights + 512 * 64
    assert memory["gradients"] == memory["parameters"] and memory["optimizer"] >= 2 * weights
    assert memory["activations"] > 0 and memory["temporaries"] >= 0

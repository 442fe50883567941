"""The data-efficiency benchmark's smoke run (``--quick``, one seed, a generated corpus): every output
file, every case, and each case's FLOP accounting recomputed here from the formulas."""

import json
import math

import pytest
import torch

import autopar
from autopar.passes.random_ltd.schedule import kept_tokens
from benchmarks import data_efficiency as de
from tests.data.generated import write_corpus

SETUP = de.QUICK


def flops_by_hand(*, b, s, kept, assignments, moe_layers, ltd_layers):
    """3 × forward matmul FLOPs: per layer 2·(4h²)·k + 4h·k² (attention) + MLP 2·2·h·f per token
    (MoE: per computed assignment, plus the router 2·h·E per token), and the head 2·h·V per token."""
    model = SETUP.model
    h, f, v, e = model.hidden_size, 4 * model.hidden_size, model.vocab_size, SETUP.moe_experts
    total = b * s * 2 * h * v
    for layer in range(SETUP.model.num_layers):
        k = kept if layer in ltd_layers else s
        total += b * k * 8 * h * h + b * 4 * h * k * k
        if layer in moe_layers:
            total += assignments[moe_layers.index(layer)] * 4 * h * f + b * k * 2 * h * e
        else:
            total += b * k * 4 * h * f
    return 3 * total


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_efficiency")
    write_corpus(root / "corpus")
    argv = [
        "--quick",
        "--seeds",
        "1",
        "--corpus",
        str(root / "corpus"),
        "--out",
        str(root / "out"),
        "--cache-dir",
        str(root / "cache"),
        "--work-dir",
        str(root / "work"),
    ]
    assert de.main(argv) == 0
    first = json.loads((root / "out" / "data_efficiency.json").read_text())
    assert de.main(argv) == 0  # resumed: every run is found and kept, nothing trains again
    second = json.loads((root / "out" / "data_efficiency.json").read_text())
    assert second["runs"] == first["runs"]
    return root / "out", first


def test_outputs_and_structure(result):
    out, payload = result
    for name in (
        "data_efficiency.json",
        "data_efficiency.csv",
        "data_efficiency.md",
        "data_efficiency.png",
        "data_efficiency.svg",
        "data_efficiency_fim.png",
        "data_efficiency_fim.svg",
    ):
        assert (out / name).stat().st_size > 0, name
    assert sorted(payload["runs"]) == sorted(f"{case}/0" for case in de.CASES)
    assert payload["missing"] == []
    assert {v["case"] for v in payload["verdicts"]} == set(de.CLAIMS)
    assert {v["verdict"] for v in payload["verdicts"]} <= {"reproduced", "partly", "not at this scale"}
    markdown = (out / "data_efficiency.md").read_text()
    assert "## Verdicts" in markdown and payload["command"] in markdown
    csv_lines = (out / "data_efficiency.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + sum(len(r["curve"]) for r in payload["runs"].values())
    for run in payload["runs"].values():
        assert len(run["curve"]) == SETUP.num_evals + (run["case"] in de.CONTINUE)
        assert all(math.isfinite(row["heldout_loss"]) for row in run["curve"])
        assert [r["flops"] for r in run["curve"]] == sorted(r["flops"] for r in run["curve"])
    for case in ("baseline", "fim"):
        assert payload["runs"][f"{case}/0"]["curve"][-1]["fim_all_loss"] is not None


def test_flops_per_step_match_the_formula_and_the_flop_counter(result):
    _, payload = result
    moe = list(de.moe_layers(SETUP))
    for run in payload["runs"].values():
        spec = de.CASE_SPECS[run["case"]]
        ltd = list(range(1, SETUP.model.num_layers - 1)) if spec.ltd else []
        for row in run["per_step"]:
            expected = flops_by_hand(
                b=SETUP.batch_size,
                s=row["seq_len"],
                kept=row["kept"],
                assignments=row["assignments"],
                moe_layers=moe if spec.moe else [],
                ltd_layers=ltd,
            )
            assert row["flops"] == expected, run["case"]
        assert run["flops"] == sum(row["flops"] for row in run["per_step"])
    model = SETUP.build_model()
    compiled = autopar.compile(model, "local:1")
    compiled.prepare(torch.zeros(SETUP.batch_size, SETUP.model.seq_len, dtype=torch.long))
    assert compiled.captured.flops_per_step == de.step_flops(
        SETUP, batch_size=SETUP.batch_size, seq_len=SETUP.model.seq_len
    )


def test_each_case_follows_its_schedule_and_budget(result):
    _, payload = result
    runs = {r["case"]: r for r in payload["runs"].values()}
    full = SETUP.batch_size * SETUP.model.seq_len
    cl_steps, ltd_steps = round(SETUP.cl_fraction * SETUP.steps), round(SETUP.ltd_fraction * SETUP.steps)
    dense_flops = flops_by_hand(
        b=SETUP.batch_size, s=SETUP.model.seq_len, kept=SETUP.model.seq_len, assignments=[], moe_layers=[],
        ltd_layers=[]
    )
    budget = SETUP.steps * dense_flops
    assert runs["baseline"]["steps"] == SETUP.steps and runs["baseline"]["flops"] == budget
    for case in de.PRETRAIN:  # equal compute: within half a step of the baseline's FLOPs
        largest = max(row["flops"] for row in runs[case]["per_step"])
        assert abs(runs[case]["flops"] - budget) <= largest / 2, case
    lengths = [row["seq_len"] for row in runs["cl_seqlen"]["per_step"]]
    step = SETUP.seqlen_step
    assert lengths == [
        min(
            SETUP.model.seq_len,
            (SETUP.seqlen_min + (SETUP.model.seq_len - SETUP.seqlen_min) * t // cl_steps) // step * step,
        )
        for t in range(len(lengths))
    ]
    assert runs["cl_seqlen"]["steps"] > SETUP.steps  # shorter sequences buy more steps
    ltd = runs["random_ltd"]
    assert [row["kept"] for row in ltd["per_step"]] == [
        kept_tokens(
            t,
            seq_len=SETUP.model.seq_len,
            min_tokens=SETUP.ltd_min_tokens,
            num_steps=ltd_steps,
            granularity=SETUP.ltd_granularity,
        )
        for t in range(ltd["steps"])
    ]
    assert ltd["layer_tokens"] == ltd["consumed_layer_tokens_by_pass"] == ltd["plan"]["lr_total"]
    assert ltd["steps"] > SETUP.steps
    dense_steps = round(SETUP.continue_fraction * SETUP.steps)
    moe_flops = flops_by_hand(
        b=SETUP.batch_size,
        s=SETUP.model.seq_len,
        kept=SETUP.model.seq_len,
        assignments=[SETUP.moe_top_k * full] * len(de.moe_layers(SETUP)),
        moe_layers=list(de.moe_layers(SETUP)),
        ltd_layers=[],
    )
    assert runs["dense_continued"]["steps"] == dense_steps
    assert runs["moe_upcycled"]["steps"] == dense_steps * dense_flops // moe_flops
    assert runs["moe_upcycled"]["flops"] <= dense_steps * dense_flops
    moe_rows = runs["moe_upcycled"]["per_step"]
    assert all(a <= SETUP.moe_top_k * full for row in moe_rows for a in row["assignments"])

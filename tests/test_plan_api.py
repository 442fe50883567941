"""autopar.plan with pinned choices (the rest searched) and autopar.estimate."""

import pytest
import torch

import autopar
from autopar.cost_models import ModelProfile


@pytest.fixture(scope="module")
def gpt3():
    model = autopar.models.build("gpt3-175b", device="meta")
    inputs, _ = autopar.models.example_batch(model, batch_size=1)
    return model, inputs


def test_pinned_plan_for_gpt3_on_1024_gpus(gpt3, tmp_path):
    model, inputs = gpt3
    fix = {"tp": 8, "pp": 16, "schedule": "interleaved", "virtual_stages": 2, "microbatch_size": 1,
           "recompute": "full"}
    plan = autopar.plan(model, inputs, cluster="128x8xA100-80GB", global_batch_size=1536, fix=fix)
    par = plan.parallelism
    assert (par.dp, par.tp, par.pp) == (8, 8, 16) and plan.world_size == 1024
    assert len(plan.stages) == 32 and plan.schedule.num_microbatches == 1536 // 8
    assert {s.recompute for s in plan.stages} == {"full"}
    assert sum(s.strategy == "colwise" for s in plan.shardings) == 2 * 96  # QKV and MLP-in per layer
    predicted = plan.predicted
    assert predicted.step_time_s > 0 and 0 < predicted.mfu < 1
    assert len(predicted.peak_memory_bytes) == 1024
    assert max(predicted.peak_memory_bytes) < 80 * 2**30
    assert sum(dict(predicted.breakdown).values()) == pytest.approx(predicted.step_time_s, rel=1e-9)
    plan.save(tmp_path / "plan.json")
    assert autopar.Plan.load(tmp_path / "plan.json") == plan


def test_estimate_recomputes_the_prediction(gpt3):
    model, inputs = gpt3
    plan = autopar.plan(model, inputs, cluster="16x8xA100-80GB", global_batch_size=256,
                        fix={"tp": 8, "pp": 8, "microbatch_size": 1})
    again = autopar.estimate(plan, model, inputs)
    assert again == plan.predicted
    program = autopar.lower(model, inputs, cluster=plan.cluster_spec())
    assert autopar.estimate(plan, program) == plan.predicted
    profile = ModelProfile.from_captured(program.captured, batch_size=1, dtype="bf16")  # GPU plans: bf16
    assert autopar.estimate(plan, profile) == plan.predicted


def test_unpinned_degrees_are_searched():
    model = autopar.models.build("gpt2", device="meta")
    inputs, _ = autopar.models.example_batch(model, batch_size=1)
    plan = autopar.plan(model, inputs, cluster="1x8xA100-80GB", global_batch_size=64)
    assert (plan.parallelism.dp, plan.parallelism.tp, plan.parallelism.pp) == (8, 1, 1)
    assert plan.predicted.step_time_s > 0


def test_errors(gpt3):
    model, inputs = gpt3
    with pytest.raises(ValueError, match=r"tp\(8\) × pp\(8\) = 192 ≠ world size 64|≠ world size 64"):
        autopar.plan(model, inputs, cluster="8x8xA100-80GB", global_batch_size=64,
                     fix={"tp": 8, "pp": 8, "dp": 3})
    with pytest.raises(ValueError, match="global_batch_size = 0"):
        autopar.plan(model, inputs, cluster="8x8xA100-80GB", global_batch_size=0)
    with pytest.raises(ValueError, match="unknown device type"):
        autopar.plan(model, inputs, cluster="8x8xV100", global_batch_size=64)
    with pytest.raises(ValueError, match="needs example_inputs"):
        autopar.estimate(None, model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="estimate needs"):
        autopar.estimate(None, 42)  # type: ignore[arg-type]
    assert torch.is_tensor(inputs)


def test_a_plan_carries_the_fingerprint_the_runtime_checks():
    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=4, hidden_size=64, num_heads=4, vocab_size=256, seq_len=32)
    inputs, _ = autopar.models.example_batch(model, batch_size=16)
    fix = {"pp": 2, "microbatch_size": 4}
    plan = autopar.plan(model, inputs, cluster="local:2", global_batch_size=16, fix=fix)
    assert plan.schedule.microbatch_size == 4
    # what autopar.compile(model, "local:2", plan=plan) captures on each rank: one microbatch
    runtime_graph = autopar.capture(model, inputs[:4]).graph_module
    assert plan.graph_fingerprint == autopar.plans.graph_fingerprint(runtime_graph)

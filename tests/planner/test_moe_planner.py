"""The planner with MoE layers: expert parallelism is searched, chosen when it pays, and shown."""

import functools

import pytest
import torch
from rich.console import Console

import autopar
from autopar import fmt
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import CostOptions, ModelProfile, moe_profile
from autopar.cost_models.stages import expert_groups
from autopar.models import get_config
from autopar.passes import MoE, RandomLTD
from autopar.planner import PlanContext, search
from autopar.planner.bounds import step_lower_bound_s
from autopar.planner.explain import alternative_reason
from autopar.planner.search import _modes, _Search
from autopar.planner.space import candidates
from autopar.views import build_view
from autopar.views.explain import degree_reasons
from autopar.views.text import render

# 2 of 4 layers MoE with 16 experts of 2·4096·16384 parameters: 4.3 B expert parameters whose
# gradients, replicated on 8 ranks, take longer to sync than the all-to-alls that shard them
BIG_EXPERTS = dict(num_layers=4, hidden_size=4096, num_heads=32, seq_len=1024, vocab_size=8192)


def _plan(shape: dict, cluster: str, batch: int, **kwargs) -> autopar.Plan:
    model = autopar.models.build("gpt", device="meta", **shape)
    inputs = torch.zeros(1, shape["seq_len"], dtype=torch.long, device="meta")
    return autopar.plan(model, inputs, cluster=cluster, global_batch_size=batch, **kwargs)


@functools.cache
def _big_experts(**fix) -> autopar.Plan:
    return _plan(BIG_EXPERTS, "1x8xA100-80GB", 32, passes=[MoE(num_experts=16, top_k=2)], fix=fix or None)


def _printed(plan: autopar.Plan) -> str:
    console = Console(width=100, no_color=True, record=True, force_terminal=False)
    console.print(render(build_view(autopar.Plan.from_json(plan.to_json()), timeline=False), width=100))
    return " ".join(console.export_text().split())


def test_large_experts_make_the_planner_shard_them_over_expert_parallel_ranks():
    plan = _big_experts()
    par = plan.parallelism
    assert (par.dp, par.tp, par.pp, par.ep) == (8, 1, 1, 8)
    breakdown = plan.predicted.breakdown_dict()
    assert breakdown["ep_comm"] > 0
    replicated = _big_experts(ep=1)  # the best plan that keeps every expert on every rank
    assert replicated.parallelism.ep == 1 and replicated.predicted.breakdown_dict()["ep_comm"] == 0.0
    assert plan.predicted.step_time_s < replicated.predicted.step_time_s
    assert breakdown["dp_comm"] < replicated.predicted.breakdown_dict()["dp_comm"]
    [ep1] = [alt for alt in plan.alternatives if alt.parallelism.ep == 1]  # the search's contrast for ep 1
    assert ep1.predicted_step_time_s == pytest.approx(replicated.predicted.step_time_s)
    assert "ep1 instead of ep8: expert all-to-all -" in ep1.reason and "gradient sync +" in ep1.reason
    text = _printed(plan)  # what `autopar show` prints for the saved plan
    assert "dp8 tp1 pp1 ep8" in text
    assert f"EP all-to-all {fmt.seconds(breakdown['ep_comm'])}" in text
    reasons = " ".join(degree_reasons(build_view(plan, timeline=False)))  # `autopar explain`
    assert "ep 8: each group of 8 data-parallel ranks shares the experts" in reasons


def test_the_same_model_without_moe_keeps_ep_1():
    plan = _plan(BIG_EXPERTS, "1x8xA100-80GB", 32)
    assert plan.parallelism.ep == 1 and plan.predicted.breakdown_dict()["ep_comm"] == 0.0
    assert all(alt.parallelism.ep == 1 for alt in plan.alternatives)


def test_deepspeed_layout_dense_over_all_ranks_experts_over_ep_within_a_node():
    """Two nodes: ep 8 keeps the all-to-all on NVLink; dense and expert gradients cross nodes."""
    shape = dict(num_layers=4, hidden_size=2048, num_heads=16, seq_len=2048, vocab_size=8192)
    plan = _plan(shape, "2x8xA100-80GB", 128, passes=[MoE(num_experts=16, top_k=2)])
    assert (plan.parallelism.dp, plan.parallelism.ep) == (16, 8)
    assert plan.mesh.axis_names == ("pp", "dp", "cp", "tp")  # ep is Parallelism.ep, not a mesh axis
    assert expert_groups(plan, plan.stages[0].devices) == (tuple(range(8)), (0, 8))
    assert any(alt.parallelism.ep != 8 and "instead of ep8: expert all-to-all" in alt.reason
               for alt in plan.alternatives)


def test_pinned_ep_needs_moe_layers_and_a_divisor_of_the_experts():
    with pytest.raises(ValueError, match="expert parallelism needs MoE layers"):
        _plan(BIG_EXPERTS, "1x8xA100-80GB", 32, fix={"ep": 2})
    profile = moe_profile(ModelProfile.gpt(get_config("gpt", **BIG_EXPERTS)), num_experts=6, top_k=2)
    ctx = PlanContext(model="gpt", graph_fingerprint="analytic", cluster=ClusterSpec.parse("1x8xA100-80GB"),
                      global_batch_size=32, seq_len=1024, num_layers=4)
    with pytest.raises(ValueError, match="does not divide the MoE layers' 6 experts"):
        search(profile, ctx, fix=Fix(ep=4))


def test_ep_choices_divide_dp_and_the_experts_with_any_tensor_parallel_degree():
    profile = moe_profile(ModelProfile.gpt(get_config("gpt", **BIG_EXPERTS)), num_experts=12, top_k=2)
    cluster = ClusterSpec.parse("1x8xA100-80GB")
    seen = {(c.dp, c.tp, c.ep) for c in candidates(profile, cluster, global_batch_size=32, fix=Fix())}
    assert {ep for dp, tp, ep in seen if dp == 8} == {1, 2, 4}  # divisors of gcd(8, 12)
    assert {ep for dp, tp, ep in seen if (dp, tp) == (4, 2)} == {1, 2, 4}  # each tp coordinate: its groups
    assert {ep for dp, tp, ep in seen if (dp, tp) == (2, 4)} == {1, 2}
    assert all(dp % ep == 0 and 12 % ep == 0 for dp, tp, ep in seen)
    dense = ModelProfile.gpt(get_config("gpt", **BIG_EXPERTS))
    assert {c.ep for c in candidates(dense, cluster, global_batch_size=32, fix=Fix())} == {1}
    pinned = {c.ep for c in candidates(profile, cluster, global_batch_size=32, fix=Fix(ep=2))}
    assert pinned == {2}


def test_lower_bounds_stay_below_the_estimate_with_experts():
    shape = dict(num_layers=4, hidden_size=1024, num_heads=16, seq_len=512, vocab_size=8192)
    profile = moe_profile(ModelProfile.gpt(get_config("gpt", **shape)), num_experts=8, top_k=2)
    cluster = ClusterSpec.parse("2x4xA100-80GB")
    ctx = PlanContext(model="gpt", graph_fingerprint="analytic", cluster=cluster, global_batch_size=16,
                      seq_len=512, num_layers=4)
    state, fix = _Search(profile, ctx, Fix(), CostOptions(), None), Fix()
    configs = [c for c in candidates(profile, cluster, global_batch_size=16, fix=fix)
               if c.ep > 1 or c.zero == 1]
    assert len({c.ep for c in configs}) == 4
    assert any(c.tp > 1 and c.ep > 1 for c in configs) and any(c.pp == 4 for c in configs)
    for config in configs:
        found = state.evaluate(config)
        if found is not None:
            bound = step_lower_bound_s(state.prober, config, _modes(fix, config), CostOptions())
            assert bound <= found.step_time_s * (1 + 1e-9), config.describe()


def test_alternative_reasons_name_what_a_different_ep_changes():
    best, other = _big_experts(), _big_experts(ep=1)
    assert other.parallelism.ep == 1
    reason = alternative_reason(best, other, "dp8 ep1")
    assert "ep1 instead of ep8: expert all-to-all -" in reason and "gradient sync +" in reason


def test_estimate_applies_the_plans_recorded_passes():
    """``autopar.estimate(plan, model, inputs)`` re-runs the plan's MoE pass: the same prediction."""
    model = autopar.models.build("gpt", device="meta", **BIG_EXPERTS)
    inputs = torch.zeros(1, BIG_EXPERTS["seq_len"], dtype=torch.long, device="meta")
    plan = _big_experts()
    assert [p.name for p in plan.passes] == ["moe"]
    assert autopar.plan_api.plan_passes(plan) == [MoE(num_experts=16, top_k=2)]
    assert autopar.estimate(plan, model, inputs) == plan.predicted
    saved = autopar.Plan.from_json(plan.to_json())  # the pass config survives JSON
    assert autopar.estimate(saved, model, inputs) == plan.predicted
    dense = autopar.estimate(plan, model, inputs, passes=[])  # the model as built: no experts
    assert dense.breakdown_dict()["ep_comm"] == 0.0 and dense.step_time_s < plan.predicted.step_time_s
    shape = dict(num_layers=4, hidden_size=1024, num_heads=16, seq_len=512, vocab_size=8192)
    both = [RandomLTD(min_tokens=128, num_steps=100), MoE(num_experts=8)]  # LTD: time averaged, memory full
    plan = _plan(shape, "1x8xA100-80GB", 16, passes=both)
    model = autopar.models.build("gpt", device="meta", **shape)
    inputs = torch.zeros(1, 512, dtype=torch.long, device="meta")
    assert autopar.plan_api.plan_passes(plan) == both
    assert autopar.estimate(plan, model, inputs) == plan.predicted


def test_expert_parallelism_combines_with_tensor_parallelism():
    """tp 2 × ep 4 on 8 GPUs: the ep groups are per tp coordinate; the plan is estimated."""
    shape = dict(num_layers=4, hidden_size=1024, num_heads=16, seq_len=512, vocab_size=8192)
    plan = _plan(shape, "1x8xA100-80GB", 16, passes=[MoE(num_experts=8, top_k=2)], fix={"tp": 2, "ep": 4})
    par = plan.parallelism
    assert (par.dp, par.tp, par.ep) == (4, 2, 4)
    assert plan.predicted.breakdown_dict()["ep_comm"] > 0 and plan.predicted.breakdown_dict()["tp_comm"] > 0
    assert plan.stages[0].devices == tuple(range(8))
    assert expert_groups(plan, plan.stages[0].devices) == ((0, 2, 4, 6), (0,))  # tp coordinate 0, dp/ep = 1
    assert "dp4 tp2 pp1 ep4" in _printed(plan)

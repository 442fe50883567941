"""The planner's lower bounds (``planner.bounds``) stay below ``estimate`` with data-parallel traffic
priced per layer at every ZeRO stage, and bound ZeRO-3 above 0 (the reductions after the last
backward and the first gathers no compute can hide)."""

import dataclasses

import pytest

from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import CostOptions, ModelProfile
from autopar.cost_models.megatron import MEGATRON_2021
from autopar.models import get_config
from autopar.planner import PlanContext
from autopar.planner.bounds import outside_lower_bound_s, step_lower_bound_s
from autopar.planner.search import _modes, _Search
from autopar.planner.space import candidates


@pytest.mark.parametrize("options", [CostOptions(), CostOptions(dp_overlap=0.5), MEGATRON_2021],
                         ids=["per-layer", "half", "megatron-2021"])
def test_lower_bounds_stay_below_the_estimate_at_every_zero_stage(options):
    shape = dict(num_layers=4, hidden_size=1024, num_heads=16, seq_len=512, vocab_size=8192)
    profile = ModelProfile.gpt(get_config("gpt", **shape))
    cluster = ClusterSpec.parse("2x4xA100-80GB")
    ctx = PlanContext(model="gpt", graph_fingerprint="analytic", cluster=cluster, global_batch_size=16,
                      seq_len=512, num_layers=4)
    fix = Fix()
    state = _Search(profile, ctx, fix, options, None)
    configs = [c for c in candidates(profile, cluster, global_batch_size=16, fix=fix) if c.dp > 1]
    assert {c.zero for c in configs} == {0, 1, 3} and any(c.pp > 1 for c in configs)  # ZeRO-2 ≡ 1 in time
    for config in configs:
        found = state.evaluate(config)
        if found is not None:
            bound = step_lower_bound_s(state.prober, config, _modes(fix, config), options)
            assert bound <= found.step_time_s * (1 + 1e-9), config.describe()
            if config.zero == 3:  # more traffic than ZeRO-1, the same optimizer shard: a larger bound
                zero1 = dataclasses.replace(config, zero=1)
                assert (outside_lower_bound_s(profile, ctx, config, options)
                        > outside_lower_bound_s(profile, ctx, zero1, options)), config.describe()

"""Cost models (layer: above kernels, below passes), imported only as ``autopar.cost_models``.

Data flow: a ``ModelProfile`` (``profile``: what ``autopar.lower`` summarizes from an annotated
graph) and a ``Plan`` go in; ``Predicted`` comes out of ``estimate`` (the one pricing path that
``autopar.lower.predict`` calls) from per-stage times (``compute``, ``comm``, ``stages``), the
schedule (``schedule``, ``simulate``), memory (``memory``, ``states``) and Mixture-of-Experts costs
(``moe``); ``token_dropping`` prices random-LTD's shorter layers. Local CPU clusters take
``local`` (priced from this machine's calibrated rates). ``megatron`` holds Megatron-LM's 2021
setting (its options, a row's Plan and analytic profile); the published measurements they are
validated against live in ``benchmarks/published``. Device and link specs are ``autopar.hardware``,
below every layer; the calibration that measures this machine is ``autopar.calibration``, above.
"""

from autopar.cost_models.comm import (
    Group,
    all_gather_time_s,
    all_reduce_time_s,
    all_to_all_time_s,
    broadcast_time_s,
    p2p_time_s,
    reduce_scatter_time_s,
    tp_volume_elements_per_layer,
)
from autopar.cost_models.compute import LayerTimes, matmul_efficiency, matmul_time_s, transformer_layer_times
from autopar.cost_models.estimate import CostOptions, estimate, estimate_plan, simulate_plan, stage_costs
from autopar.cost_models.megatron import (
    MEGATRON_2021,
    megatron_cluster,
    megatron_fix,
    megatron_plan,
    megatron_profile,
)
from autopar.cost_models.memory import (
    activation_bytes_per_layer,
    in_flight_microbatches,
    model_state_bytes,
    peak_memory_bytes,
    plan_memory,
)
from autopar.cost_models.moe import MoELayerProfile, load_imbalance, moe_profile
from autopar.cost_models.profile import LayerProfile, ModelProfile
from autopar.cost_models.schedule import StageTimes, bubble_fraction, pipeline_time, rank_actions
from autopar.cost_models.simulate import Timeline, TimelineEvent, simulate

__all__ = [
    "MEGATRON_2021", "CostOptions", "Group", "LayerProfile", "LayerTimes", "ModelProfile", "MoELayerProfile",
    "StageTimes", "Timeline", "TimelineEvent", "activation_bytes_per_layer", "all_gather_time_s",
    "all_reduce_time_s", "all_to_all_time_s", "broadcast_time_s", "bubble_fraction", "estimate",
    "estimate_plan", "in_flight_microbatches", "load_imbalance", "matmul_efficiency", "matmul_time_s",
    "megatron_cluster", "megatron_fix", "megatron_plan", "megatron_profile", "model_state_bytes",
    "moe_profile", "p2p_time_s", "peak_memory_bytes", "pipeline_time", "plan_memory", "rank_actions",
    "reduce_scatter_time_s", "simulate", "simulate_plan", "stage_costs", "tp_volume_elements_per_layer",
    "transformer_layer_times",
]

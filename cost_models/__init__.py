"""Cost models: hardware catalog, compute, communication, memory and schedule models.

Data flow: the annotated graph (``node.meta["autopar"]``) and a ``ClusterSpec`` go in;
per-node and per-stage times and bytes come out for the planner. ``hardware`` is the
table of devices and links that ``ClusterSpec`` references and every model reads;
``profile`` summarizes a captured model (``ModelProfile``); ``compute``, ``comm``,
``memory`` and ``schedule`` are the analytic models; ``simulate`` draws a schedule's
timeline; ``moe`` prices Mixture-of-Experts layers (expert compute, all-to-all, expert states);
``estimate`` turns a Plan into ``Predicted``; ``megatron`` holds Megatron-LM's setting (its 2021
code's options, the Plan and analytic profile of one of its configurations; the published
measurements they are validated against live in ``benchmarks/published``). Local CPU clusters
take ``cpu_step`` (with ``cpu_compute``, ``cpu_rates`` and ``shared_cores``), priced from the
profile ``calibrate`` measures (``local_profile``). Imported only as ``autopar.cost_models``
(see ARCHITECTURE.md). Modules here import ``autopar.cluster`` and ``autopar.plans`` only
inside functions: those import the hardware catalog, so a module-level import would cycle.
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
from autopar.cost_models.hardware import (
    DEVICE_ALIASES,
    DEVICE_CATALOG,
    DTYPES,
    GLOO_LOOPBACK,
    GLOO_TCP,
    IB_HDR,
    IB_NDR,
    NVLINK_A100,
    NVLINK_H100,
    DeviceSpec,
    LinkLevel,
    canonical_dtype,
    default_links,
    get_device,
    valid_device_names,
)
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
    "DEVICE_ALIASES", "DEVICE_CATALOG", "DTYPES", "GLOO_LOOPBACK", "GLOO_TCP", "IB_HDR", "IB_NDR",
    "MEGATRON_2021", "NVLINK_A100", "NVLINK_H100", "CostOptions", "DeviceSpec", "Group", "LayerProfile",
    "LayerTimes", "LinkLevel", "ModelProfile", "MoELayerProfile", "StageTimes", "Timeline", "TimelineEvent",
    "activation_bytes_per_layer", "all_gather_time_s", "all_reduce_time_s", "all_to_all_time_s",
    "broadcast_time_s", "bubble_fraction", "canonical_dtype", "default_links", "estimate",
    "estimate_plan", "get_device", "in_flight_microbatches", "load_imbalance", "matmul_efficiency",
    "matmul_time_s", "megatron_cluster", "megatron_fix", "megatron_plan", "megatron_profile",
    "model_state_bytes", "moe_profile", "p2p_time_s", "peak_memory_bytes", "pipeline_time",
    "plan_memory", "rank_actions", "reduce_scatter_time_s", "simulate", "simulate_plan",
    "stage_costs", "tp_volume_elements_per_layer", "transformer_layer_times", "valid_device_names",
]

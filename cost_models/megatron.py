"""Megatron-LM's training setting as autopar prices it: its code's options, its layout, its profile.

Data flow: :data:`MEGATRON_2021` (the ``CostOptions`` of Megatron-LM's 2021 code: no tensor- or
data-parallel overlap) and :func:`megatron_fix` (one Megatron configuration's choices, in the form
``autopar.plan(..., fix=...)`` takes) → either the public path (``autopar.plan`` on a model with
those pins, whose ``plan.predicted`` is ``estimate``'s) or, without a model, :func:`megatron_plan`
(the same choices as a Plan, through ``plans.pinned.plan_from_fix``) priced on
:func:`megatron_profile` (the analytic profile of a zoo GPT) by the same ``estimate`` with the same
options. ``tests/planner/test_pricing_path.py`` checks that both give the same step time.

Choices a configuration leaves unstated get Megatron-LM's defaults, stated here: microbatch size 1,
full recomputation, ZeRO 0, interleaved 1F1B with ``virtual_stages`` the smallest v ≥ 2 dividing
the layers per stage (the fewest chunks; 1F1B without pipelining or when no such v exists),
contiguous equal stages, 8 GPUs per node with tensor parallelism fastest in the device order.

The attention kernel is the model's: ``megatron_profile`` prices unfused attention (Megatron-LM
2021 materialized the scores), a captured model prices what its graph calls (fused for
``scaled_dot_product_attention``). The published measurements these are validated against
(Narayanan et al. SC'21, Korthikanti et al. 2022) and the model Megatron-LM ran live in
``benchmarks/published/megatron.py``; nothing here imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autopar.cost_models.estimate import CostOptions
from autopar.cost_models.profile import ModelProfile

if TYPE_CHECKING:
    from autopar.cluster import ClusterSpec
    from autopar.config import Fix
    from autopar.plans import Plan

MEGATRON_2021 = CostOptions(dp_overlap=0.0, tp_overlap=0.0, sequence_parallel=False, p2p_scatter_gather=True)
"""Megatron-LM's 2021 code (the SC'21 runs): data-parallel gradients all-reduced after the
backward, no asynchronous tensor-parallel all-reduce, no sequence parallelism, pipeline sends
scattered over the tensor-parallel ranks. Usable for any model: ``autopar.plan(...,
options=MEGATRON_2021)`` prices a plan as that code would run it."""

GPUS_PER_NODE = 8


def default_virtual_stages(num_layers: int, pp: int) -> int:
    """The smallest v ≥ 2 dividing the layers per stage (1 without pipelining)."""
    if pp == 1:
        return 1
    per_stage = num_layers // pp
    return next((v for v in range(2, per_stage + 1) if per_stage % v == 0), 1)


def megatron_cluster(num_gpus: int, *, device: str = "A100-80GB") -> ClusterSpec:
    """``num_gpus`` DGX-style GPUs: nodes of 8 (one node of ``num_gpus`` when 8 does not divide it)."""
    from autopar.cluster import ClusterSpec

    nodes, per_node = ((num_gpus // GPUS_PER_NODE, GPUS_PER_NODE) if num_gpus % GPUS_PER_NODE == 0
                       else (1, num_gpus))
    return ClusterSpec.parse(f"{nodes}x{per_node}x{device}")


def megatron_fix(config_name: str, *, num_gpus: int, tp: int, pp: int, global_batch_size: int,
                 microbatch_size: int = 1, schedule: str = "interleaved", virtual_stages: int | None = None,
                 recompute: str = "full") -> Fix:
    """Every choice of a Megatron-LM configuration of the zoo GPT ``config_name`` pinned (module
    docstring for the defaults). ``virtual_stages`` defaults to :func:`default_virtual_stages` for
    the interleaved schedule, which becomes 1F1B when that is 1 (e.g. without pipelining)."""
    from autopar.config import Fix
    from autopar.models import get_config

    if schedule != "interleaved":
        virtual_stages = virtual_stages or 1
    elif virtual_stages is None:
        virtual_stages = default_virtual_stages(get_config(config_name).num_layers, pp)
    if schedule == "interleaved" and virtual_stages == 1:  # nothing to interleave without pipelining
        schedule = "1f1b"
    dp = num_gpus // (tp * pp)
    if dp * tp * pp != num_gpus or global_batch_size % (dp * microbatch_size):
        raise ValueError(f"tp({tp}) × pp({pp}) × dp({dp}) must equal num_gpus({num_gpus}) and "
                         f"global batch {global_batch_size} must divide by dp × microbatch_size")
    return Fix(dp=dp, tp=tp, pp=pp, microbatch_size=microbatch_size, schedule=schedule,  # type: ignore[arg-type]
               virtual_stages=virtual_stages, recompute=recompute, zero=0,  # type: ignore[arg-type]
               num_microbatches=global_batch_size // (dp * microbatch_size))


def megatron_plan(config_name: str, *, num_gpus: int, tp: int, pp: int, global_batch_size: int,
                  microbatch_size: int = 1, schedule: str = "interleaved", virtual_stages: int | None = None,
                  recompute: str = "full", device: str = "A100-80GB") -> Plan:
    """The Plan of :func:`megatron_fix`'s choices for the zoo GPT ``config_name`` on
    :func:`megatron_cluster`, without capturing a model: contiguous equal layer stages, tensor
    parallelism fastest in the device order, then data, then pipeline (what ``autopar.plan``
    returns for the same pins, less the graph's shardings and fingerprint)."""
    from autopar.models import get_config
    from autopar.plans.pinned import plan_from_fix

    config = get_config(config_name)
    fix = megatron_fix(config_name, num_gpus=num_gpus, tp=tp, pp=pp, global_batch_size=global_batch_size,
                       microbatch_size=microbatch_size, schedule=schedule, virtual_stages=virtual_stages,
                       recompute=recompute)
    return plan_from_fix(config_name, graph_fingerprint=f"analytic:{config_name}",
                         num_layers=config.num_layers, cluster=megatron_cluster(num_gpus, device=device),
                         fix=fix, global_batch_size=global_batch_size, seq_len=config.seq_len)


def megatron_profile(config_name: str, *, fused_attention: bool = False) -> ModelProfile:
    """The analytic profile of a zoo GPT in bf16; by default as Megatron-LM 2021 ran it (unfused
    attention), with ``fused_attention`` as the zoo model itself runs (its graph calls
    ``scaled_dot_product_attention``)."""
    from autopar.models import get_config

    return ModelProfile.gpt(get_config(config_name), name=config_name, fused_attention=fused_attention)

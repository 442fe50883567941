"""Published Megatron-LM measurements the cost model is validated (not fitted) against.

Data flow: :data:`WEAK_SCALING` (Narayanan et al., "Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM", SC'21, arXiv 2104.04473, Table 1) →
:func:`megatron_plan` builds each row's Plan on N × DGX A100 80GB → ``estimate`` predicts its
TFLOP/s per GPU → ``benchmarks/cost_model_megatron.py`` writes the side-by-side table and a
test asserts the agreement. The setting (TECHNIQUES §1): vocabulary 51,200, sequence 2048,
mixed precision, full activation recomputation, interleaved 1F1B where p > 1, Megatron's
FLOP count ``96 B s l h² (1 + s/(6h) + V/(16 l h))``; 2021 code, hence :data:`MEGATRON_2021`
options (no tensor- or data-parallel overlap) and unfused attention.

Not published per row, so chosen here and stated: microbatch size 1; ``virtual_stages`` the
smallest v ≥ 2 dividing the layers per stage (the fewest chunks); contiguous equal stages;
the zoo's ``megatron-*`` shapes (``autopar.models.configs``).

:func:`korthikanti_22b_layer_ms` reproduces the one measurement the A100 matmul efficiency is
fitted to (Korthikanti et al. 2022, Table 4; not a row of the validation table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from autopar.cost_models.comm import Group, all_reduce_time_s
from autopar.cost_models.compute import Kernels, transformer_layer_times
from autopar.cost_models.estimate import CostOptions, estimate
from autopar.cost_models.profile import LayerProfile, ModelProfile

if TYPE_CHECKING:
    from autopar.plans import Plan

MEGATRON_2021 = CostOptions(dp_overlap=0.0, tp_overlap=0.0, sequence_parallel=False, p2p_scatter_gather=True)
PAPER = "Narayanan et al., SC'21, arXiv 2104.04473, Table 1"


@dataclass(frozen=True, kw_only=True)
class WeakScalingRow:
    """One row of the published table: configuration and achieved TFLOP/s per GPU."""

    model: str
    tp: int
    pp: int
    num_gpus: int
    global_batch_size: int
    published_tflops_per_gpu: float


WEAK_SCALING: tuple[WeakScalingRow, ...] = tuple(
    WeakScalingRow(model=f"megatron-{name}", tp=tp, pp=pp, num_gpus=gpus, global_batch_size=batch,
                   published_tflops_per_gpu=tflops)
    for name, tp, pp, gpus, batch, tflops in (
        ("1.7b", 1, 1, 32, 512, 137), ("3.6b", 2, 1, 64, 512, 138), ("7.5b", 4, 1, 128, 512, 142),
        ("18b", 8, 1, 256, 1024, 135), ("39b", 8, 2, 512, 1536, 138), ("76b", 8, 4, 1024, 1792, 140),
        ("145b", 8, 8, 1536, 2304, 148), ("310b", 8, 16, 1920, 2160, 155),
        ("530b", 8, 35, 2520, 2520, 163), ("1t", 8, 64, 3072, 3072, 163)))


def default_virtual_stages(num_layers: int, pp: int) -> int:
    """The smallest v ≥ 2 dividing the layers per stage (1 without pipelining)."""
    if pp == 1:
        return 1
    per_stage = num_layers // pp
    return next((v for v in range(2, per_stage + 1) if per_stage % v == 0), 1)


def megatron_plan(config_name: str, *, num_gpus: int, tp: int, pp: int, global_batch_size: int,
                  microbatch_size: int = 1, schedule: str = "interleaved", virtual_stages: int | None = None,
                  recompute: str = "full", device: str = "A100-80GB") -> Plan:
    """A Plan for a zoo GPT on ``num_gpus`` DGX-style GPUs (8 per node): contiguous uniform
    layer stages, tensor parallelism fastest in the device order, then data, then pipeline.
    ``virtual_stages`` defaults to :func:`default_virtual_stages` for the interleaved schedule
    (which becomes 1F1B when that is 1, e.g. without pipelining) and 1 otherwise."""
    from autopar.cluster import ClusterSpec
    from autopar.config import Fix
    from autopar.models import get_config
    from autopar.plans.pinned import plan_from_fix

    config = get_config(config_name)
    nodes, per_node = (num_gpus // 8, 8) if num_gpus % 8 == 0 else (1, num_gpus)
    cluster = ClusterSpec.parse(f"{nodes}x{per_node}x{device}")
    if schedule != "interleaved":
        virtual_stages = virtual_stages or 1
    elif virtual_stages is None:
        virtual_stages = default_virtual_stages(config.num_layers, pp)
    if schedule == "interleaved" and virtual_stages == 1:  # nothing to interleave without pipelining
        schedule = "1f1b"
    dp = num_gpus // (tp * pp)
    if dp * tp * pp != num_gpus or global_batch_size % (dp * microbatch_size):
        raise ValueError(f"tp({tp}) × pp({pp}) × dp({dp}) must equal num_gpus({num_gpus}) and "
                         f"global batch {global_batch_size} must divide by dp × microbatch_size")
    fix = Fix(dp=dp, tp=tp, pp=pp, microbatch_size=microbatch_size, schedule=schedule,  # type: ignore[arg-type]
              virtual_stages=virtual_stages, recompute=recompute, zero=0,  # type: ignore[arg-type]
              num_microbatches=global_batch_size // (dp * microbatch_size))
    return plan_from_fix(config_name, graph_fingerprint=f"analytic:{config_name}",
                         num_layers=config.num_layers, cluster=cluster, fix=fix,
                         global_batch_size=global_batch_size, seq_len=config.seq_len)


def megatron_profile(config_name: str) -> ModelProfile:
    """The analytic profile of a zoo GPT as Megatron-LM 2021 ran it (bf16, unfused attention)."""
    from autopar.models import get_config

    return ModelProfile.gpt(get_config(config_name), name=config_name, fused_attention=False)


@dataclass(frozen=True, kw_only=True)
class ValidationRow:
    """Predicted vs published for one row."""

    row: WeakScalingRow
    virtual_stages: int
    predicted_step_time_s: float
    predicted_tflops_per_gpu: float

    @property
    def error(self) -> float:
        """Relative error of the prediction, (predicted − published) / published."""
        return self.predicted_tflops_per_gpu / self.row.published_tflops_per_gpu - 1


def validate(rows: tuple[WeakScalingRow, ...] = WEAK_SCALING) -> tuple[ValidationRow, ...]:
    """Predict every published row with :data:`MEGATRON_2021` options."""
    results = []
    for row in rows:
        plan = megatron_plan(row.model, num_gpus=row.num_gpus, tp=row.tp, pp=row.pp,
                             global_batch_size=row.global_batch_size)
        predicted = estimate(plan, megatron_profile(row.model), options=MEGATRON_2021)
        assert predicted.step_time_s is not None and predicted.tflops_per_device is not None
        results.append(ValidationRow(row=row, virtual_stages=plan.schedule.virtual_stages,
                                     predicted_step_time_s=predicted.step_time_s,
                                     predicted_tflops_per_gpu=predicted.tflops_per_device))
    return tuple(results)


KORTHIKANTI_22B_MS = {"forward": 7.7, "backward": 11.9}
"""Korthikanti et al. 2022, Table 4: one layer of a 22B GPT (h 6144, a 64, s 2048, b 4, t 8) on
DGX A100, no recomputation, no sequence parallelism; the A100 efficiency's fitting target."""


def korthikanti_22b_layer_ms(*, tp_overlap: float = 1.0) -> dict[str, float]:
    """This model's forward and backward milliseconds for that layer, TP all-reduces included
    (two each way; backward ones hidden by ``tp_overlap``, as Megatron's asynchronous
    all-reduce in that code does)."""
    from autopar.cluster import ClusterSpec

    cluster = ClusterSpec.parse("1x8xA100-80GB")
    h, s, b, t = 6144, 2048, 4, 8
    layer = LayerProfile(name="22b", flops_fwd=24 * s * h * h + 4 * s * s * h, flops_bwd=0, param_count=0,
                         hidden_size=h, num_heads=64, seq_len=s, ffn_size=4 * h)
    kernels = Kernels(device=cluster.device, dtype="bf16", bytes_per_element=2, microbatch_size=b, tp=t)
    times = transformer_layer_times(layer, kernels=kernels, fused_attention=False)
    all_reduce = all_reduce_time_s(b * s * h * 2, group=Group(size=t), cluster=cluster)
    return {"forward": 1e3 * (times.forward_s + 2 * all_reduce),
            "backward": 1e3 * (times.backward_s + 2 * all_reduce * (1 - tp_overlap))}

"""Megatron-LM's published measurements and the model they were taken on.

Data flow: :data:`WEAK_SCALING` (Narayanan et al., "Efficient Large-Scale Language Model Training
on GPU Clusters Using Megatron-LM", SC'21, arXiv 2104.04473, Table 1) → each row's
:meth:`WeakScalingRow.fix` (every choice pinned, ``cost_models.megatron.megatron_fix``) →
:func:`validate`: the public path, ``autopar.plan(megatron_2021_model(row), …, fix=row.fix(),
options=MEGATRON_2021)`` on the row's cluster, its ``plan.predicted`` against the published TFLOP/s
per GPU → ``benchmarks/cost_model_megatron.py`` (the table). :func:`analytic_predicted` is the same
prediction without a model (``megatron_plan`` on ``megatron_profile``):
``tests/planner/test_pricing_path.py`` shows both equal on every row, and
``tests/cost_models/test_megatron.py`` checks the agreement with the paper on it (no capture).

The setting (TECHNIQUES §1): vocabulary 51,200, sequence 2048, mixed precision, full activation
recomputation, interleaved 1F1B where p > 1, Megatron's FLOP count
``96 B s l h² (1 + s/(6h) + V/(16 l h))``; 2021 code, hence ``MEGATRON_2021`` options and
:func:`megatron_2021_model`, the zoo GPT with the unfused attention that code ran.

:func:`korthikanti_22b_layer_ms` reproduces the one measurement the A100 matmul efficiency is fitted
to (Korthikanti et al. 2022, Table 4; not a row of the validation table).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import autopar
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import (
    MEGATRON_2021,
    estimate,
    megatron_cluster,
    megatron_fix,
    megatron_plan,
    megatron_profile,
)
from autopar.cost_models.comm import Group, all_reduce_time_s
from autopar.cost_models.compute import Kernels, transformer_layer_times
from autopar.cost_models.profile import LayerProfile
from autopar.models.attention import SelfAttention
from autopar.plans import Plan, Predicted

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

    def fix(self) -> Fix:
        """Every choice of the row pinned (unstated ones at Megatron-LM's defaults, ``megatron_fix``)."""
        return megatron_fix(self.model, num_gpus=self.num_gpus, tp=self.tp, pp=self.pp,
                            global_batch_size=self.global_batch_size)

    def cluster(self) -> ClusterSpec:
        """The row's DGX A100 80GB nodes."""
        return megatron_cluster(self.num_gpus)


WEAK_SCALING: tuple[WeakScalingRow, ...] = tuple(
    WeakScalingRow(model=f"megatron-{name}", tp=tp, pp=pp, num_gpus=gpus, global_batch_size=batch,
                   published_tflops_per_gpu=tflops)
    for name, tp, pp, gpus, batch, tflops in (
        ("1.7b", 1, 1, 32, 512, 137), ("3.6b", 2, 1, 64, 512, 138), ("7.5b", 4, 1, 128, 512, 142),
        ("18b", 8, 1, 256, 1024, 135), ("39b", 8, 2, 512, 1536, 138), ("76b", 8, 4, 1024, 1792, 140),
        ("145b", 8, 8, 1536, 2304, 148), ("310b", 8, 16, 1920, 2160, 155),
        ("530b", 8, 35, 2520, 2520, 163), ("1t", 8, 64, 3072, 3072, 163)))


class UnfusedSelfAttention(SelfAttention):
    """The zoo's attention as Megatron-LM 2021 computed it: the ``(b, a, s, s)`` scores
    materialized, causally masked, softmaxed, then multiplied by V (no flash kernel). Same
    parameters and FLOPs as ``SelfAttention``; the graph has no ``scaled_dot_product_attention``,
    so the cost model prices it unfused."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, h = x.shape
        a = self.num_heads
        d = self.proj.in_features // a
        q, k, v = self.qkv(x).split(h, dim=2)  # 3 × (b, s, h)
        q = q.view(b, s, a, d).transpose(1, 2)  # (b, a, s, d)
        k = k.view(b, s, a, d).transpose(1, 2)
        v = v.view(b, s, a, d).transpose(1, 2)
        scores = (q @ k.transpose(2, 3)) * d**-0.5  # (b, a, s, s)
        scores = scores + torch.full_like(scores, float("-inf")).triu(1)  # causal
        y = torch.softmax(scores, dim=-1) @ v  # (b, a, s, d)
        return self.proj(y.transpose(1, 2).reshape(b, s, h))  # (b, s, h)


def megatron_2021_model(config_name: str, *, device: str = "meta") -> nn.Module:
    """The zoo GPT ``config_name`` with every block's attention computed unfused (its weights kept)."""
    model = autopar.models.build(config_name, device=device)
    for block in model.blocks:
        old = block.attn
        with torch.device(device):  # the new module's own weights are replaced at once
            new = UnfusedSelfAttention(old.proj.in_features, old.num_heads, old.dropout, causal=True)
        new.qkv, new.proj = old.qkv, old.proj
        block.attn = new
    return model


def row_plan(row: WeakScalingRow, *, model: nn.Module | None = None) -> Plan:
    """The public path for ``row``: ``autopar.plan`` on the row's model (default
    :func:`megatron_2021_model` on ``meta``), one example sequence, every choice pinned,
    ``MEGATRON_2021`` options; ``plan.predicted`` is the cost model's estimate."""
    model = model if model is not None else megatron_2021_model(row.model)
    inputs, _ = autopar.models.example_batch(model, batch_size=1)
    return autopar.plan(model, inputs, cluster=row.cluster(), global_batch_size=row.global_batch_size,
                        fix=row.fix(), options=MEGATRON_2021)


def analytic_predicted(row: WeakScalingRow, *, fused_attention: bool = False) -> Predicted:
    """The same prediction without a model: ``megatron_plan`` of the row priced on
    ``megatron_profile`` by ``cost_models.estimate`` with ``MEGATRON_2021`` (what
    ``tests/planner/test_pricing_path.py`` checks :func:`row_plan` against)."""
    plan = megatron_plan(row.model, num_gpus=row.num_gpus, tp=row.tp, pp=row.pp,
                         global_batch_size=row.global_batch_size)
    return estimate(plan, megatron_profile(row.model, fused_attention=fused_attention), options=MEGATRON_2021)


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
    """Predict every published row through the public path (:func:`row_plan`)."""
    results = []
    for row in rows:
        plan = row_plan(row)
        predicted = plan.predicted
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
    cluster = ClusterSpec.parse("1x8xA100-80GB")
    h, s, b, t = 6144, 2048, 4, 8
    layer = LayerProfile(name="22b", flops_fwd=24 * s * h * h + 4 * s * s * h, flops_bwd=0, param_count=0,
                         hidden_size=h, num_heads=64, seq_len=s, ffn_size=4 * h)
    kernels = Kernels(device=cluster.device, dtype="bf16", bytes_per_element=2, microbatch_size=b, tp=t)
    times = transformer_layer_times(layer, kernels=kernels, fused_attention=False)
    all_reduce = all_reduce_time_s(b * s * h * 2, group=Group(size=t), cluster=cluster)
    return {"forward": 1e3 * (times.forward_s + 2 * all_reduce),
            "backward": 1e3 * (times.backward_s + 2 * all_reduce * (1 - tp_overlap))}

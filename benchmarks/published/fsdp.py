"""Published FSDP / ZeRO-3 throughputs and the public path that predicts them.

Data flow: :data:`ROWS` (each a quoted figure with its source) → :meth:`FsdpRow.fix` (pure fully
sharded data parallelism pinned: dp = GPUs, zero 3, the row's local batch and recomputation) →
:func:`validate`: ``autopar.plan`` on a zoo GPT of the row's Llama shape captured on ``meta``, its
``plan.predicted`` tokens/s per GPU against the published figure → ``benchmarks/cost_model_fsdp.py``
(the table) and ``tests/cost_models/test_fsdp_cost.py`` (the tolerance).

The Llama shapes are zoo GPTs with the same hidden size, heads, layers, vocabulary (untied) and
sequence length, and an MLP width chosen so that every layer has Llama's parameters and matmul
FLOPs: Llama's grouped-query attention (``2h² + 2h·kv``) and SwiGLU MLP (``3h·f``) hold
``4h² + 2h·f'`` with ``f' = (3f + 2kv − 2h)/2`` (``kv`` = key/value heads × head size).
Not modelled: RMSNorm/SwiGLU elementwise differences, grouped-query activations.

Clusters: the torchtitan H100 rows ran on 96 GB H100s; the catalog's H100-SXM has 80 GB, where the
memory model (Korthikanti's selective recomputation keeps ``34 sbh`` bytes per layer, more than
torchtitan's op-level policy) finds 101.9 GiB for the 8-GPU row, so those rows are priced on the
catalog's H200 (same compute peaks and NVLink, 141 GB, faster HBM: 4.8 vs their 2.4 TB/s) with
NDR 400 Gb/s per GPU, as they ran. The A100 rows' interconnect is not stated in either source;
they are priced on the catalog's DGX A100 (8 × 200 Gb/s HDR per node).

Searched for and left out (no exact figure could be read, or not ZeRO-3): Zhao et al. 2023 "PyTorch
FSDP" (VLDB) GPT-175B / T5-11B figures (the paper text was not retrievable here); Rajbhandari et
al. SC'20 100B on 400 V100 (ZeRO-100B is ZeRO-2 with Megatron model parallelism, not ZeRO-3, and
V100 is not in the catalog); Fernandez et al. 2024 (arXiv 2411.13055) fixed-global-batch FSDP
scaling to 2048 H100 (only in figures; the "−37.22 % from 128 to 2048 GPUs" seen was a secondary
summary, not read from the paper); the fms-fsdp 7B/13B rows (hybrid sharding, not modelled).
"""

from __future__ import annotations

from dataclasses import dataclass

import autopar
from autopar.plans import Plan

TORCHTITAN_H100 = ("pytorch/torchtitan docs/performance.md @ eaea6f6a (Dec 2024), Tables 1 and 3: "
                   "Llama 3.1 8B, FSDP2, no torch.compile, bf16; H100 96 GB HBM2e at 500 W, "
                   "400 Gb/s RDMA per GPU")
TORCHTITAN_A100 = ("pytorch/torchtitan docs/performance.md @ 04133643 (2024): FSDP2 on 64 A100 80GB, "
                   "WPS (tokens/s per GPU) tables")
FMS_FSDP = "foundation-model-stack/fms-fsdp README.md @ 0d319983: 128 × A100, FSDP, training throughput table"

_SHAPES = {  # name: (layers, hidden, heads, key/value heads, Llama MLP width, vocabulary, sequence)
    "llama3-8b": (32, 4096, 32, 8, 14336, 128256, 8192),
    "llama3-70b": (80, 8192, 64, 8, 28672, 128256, 8192),
    "llama2-13b": (40, 5120, 40, 40, 13824, 32000, 4096),
    "llama2-34b": (48, 8192, 64, 8, 22016, 32000, 4096),
    "llama2-70b": (80, 8192, 64, 8, 28672, 32000, 4096),
}


def llama_shape(name: str) -> dict[str, object]:
    """Zoo GPT overrides with Llama ``name``'s parameters and FLOPs per layer (module docstring)."""
    layers, h, heads, kv_heads, ffn, vocab, seq = _SHAPES[name]
    kv = kv_heads * h // heads
    return dict(num_layers=layers, hidden_size=h, num_heads=heads, vocab_size=vocab, seq_len=seq,
                ffn_size=(3 * ffn + 2 * kv - 2 * h) // 2, tie_embeddings=False)


@dataclass(frozen=True, kw_only=True)
class FsdpRow:
    """One published FSDP run: model, GPUs, per-GPU batch (sequences), recomputation and the
    tokens/s per GPU reported, quoted in ``quote`` from ``source``; ``cluster`` the catalog cluster
    it is priced on."""

    model: str
    num_gpus: int
    local_batch: int
    recompute: str
    published_tokens_per_s_per_gpu: float
    cluster: str
    source: str
    quote: str

    @property
    def global_batch_size(self) -> int:
        return self.num_gpus * self.local_batch

    def fix(self) -> dict[str, object]:
        """Pure FSDP: every GPU one data-parallel rank, ZeRO-3, one microbatch of the local batch."""
        return {"dp": self.num_gpus, "tp": 1, "pp": 1, "zero": 3, "microbatch_size": self.local_batch,
                "num_microbatches": 1, "schedule": "1f1b", "recompute": self.recompute}


def _nodes(gpus: int, device: str) -> str:
    return f"{max(1, gpus // 8)}x{min(8, gpus)}x{device}"


_H100, _A100 = "H200", "A100-80GB"  # the torchtitan H100 rows on the catalog's H200 (module docstring)
ROWS: tuple[FsdpRow, ...] = tuple(
    FsdpRow(model=model, num_gpus=gpus, local_batch=batch, recompute=recompute,
            published_tokens_per_s_per_gpu=published, cluster=_nodes(gpus, device), source=source,
            quote=quote)
    for model, gpus, batch, recompute, published, device, source, quote in (
        ("llama3-8b", 8, 2, "selective", 5762, _H100, TORCHTITAN_H100,
         "Table 1, 8 GPUs, local batch 2, selective AC: FSDP | 5,762 TPS/GPU"),
        ("llama3-8b", 128, 2, "selective", 5605, _H100, TORCHTITAN_H100,
         "Table 3, 128 GPUs, local batch 2, global batch 256, selective AC: FSDP | 5,605 TPS/GPU"),
        ("llama3-8b", 64, 1, "selective", 2973, _A100, TORCHTITAN_A100,
         "Llama 3: 8B | 1 | selective op | 2973 | 58.2%"),
        ("llama3-70b", 64, 1, "full", 331, _A100, TORCHTITAN_A100, "Llama 3: 70B | 1 | full | 331 | 51.7%"),
        ("llama2-13b", 64, 2, "none", 2162, _A100, TORCHTITAN_A100, "Llama 2: 13B | 2 | no | 2162 | 61.1%"),
        ("llama2-70b", 64, 2, "full", 353, _A100, TORCHTITAN_A100, "Llama 2: 70B | 2 | full | 353 | 50.5%"),
        ("llama2-34b", 128, 8, "full", 772, _A100, FMS_FSDP,
         "34b | 128 * A100 | FSDP | True | 8 | 772 token/gpu/sec"),
        ("llama2-70b", 128, 6, "full", 380, _A100, FMS_FSDP,
         "70b | 128 * A100 | FSDP | True | 6 | 380 token/gpu/sec"),
    ))


def row_plan(row: FsdpRow, *, num_gpus: int | None = None, local_batch: int | None = None) -> Plan:
    """The public path: ``autopar.plan`` on the row's Llama-shaped zoo GPT captured on ``meta``, FSDP
    pinned; ``num_gpus`` / ``local_batch`` override the row's (for the scaling trend: a local batch
    above the row's runs as gradient accumulation over microbatches of the row's size)."""
    gpus, batch = num_gpus or row.num_gpus, local_batch or row.local_batch
    model = autopar.models.build("gpt", device="meta", **llama_shape(row.model))  # type: ignore[arg-type]
    micro = min(batch, row.local_batch)
    # the example batch is the pinned microbatch: the capture that prices the plan is the one the
    # runtime would run, so `plan` needs no second capture for the plan's fingerprint
    inputs, _ = autopar.models.example_batch(model, batch_size=micro)
    fix = {**row.fix(), "dp": gpus, "microbatch_size": micro, "num_microbatches": batch // micro}
    cluster = row.cluster.rsplit("x", 1)[1]
    return autopar.plan(model, inputs, cluster=_nodes(gpus, cluster), global_batch_size=gpus * batch, fix=fix)


def predicted_tokens_per_s_per_gpu(plan: Plan) -> float:
    """``plan.predicted`` tokens/s divided over the plan's GPUs."""
    assert plan.predicted.tokens_per_s is not None
    return plan.predicted.tokens_per_s / plan.world_size


@dataclass(frozen=True, kw_only=True)
class FsdpResult:
    """Predicted vs published for one row, with the plan's breakdown (seconds per step)."""

    row: FsdpRow
    predicted_tokens_per_s_per_gpu: float
    step_time_s: float
    breakdown: dict[str, float]
    peak_memory_bytes: int

    @property
    def error(self) -> float:
        """(predicted − published) / published."""
        return self.predicted_tokens_per_s_per_gpu / self.row.published_tokens_per_s_per_gpu - 1


def validate_row(row: FsdpRow) -> FsdpResult:
    """One row through :func:`row_plan`."""
    plan = row_plan(row)
    predicted = plan.predicted
    assert predicted.step_time_s is not None
    return FsdpResult(row=row, predicted_tokens_per_s_per_gpu=predicted_tokens_per_s_per_gpu(plan),
                      step_time_s=predicted.step_time_s, breakdown=predicted.breakdown_dict(),
                      peak_memory_bytes=max(predicted.peak_memory_bytes))


def validate(rows: tuple[FsdpRow, ...] = ROWS) -> tuple[FsdpResult, ...]:
    """Every row through :func:`validate_row`."""
    return tuple(validate_row(row) for row in rows)

"""Pieces shared by the FlashAttention-2 forward and backward kernels (Dao 2023).

Data flow: ``attention.py`` (the custom op) → ``flash_fwd.py`` / ``flash_bwd_kv.py`` /
``flash_bwd_q.py`` → the ``@triton.jit`` helpers here (one score tile with its masks, the
dropout keep mask) and the host-side launch settings (block sizes, mask and seed views).
Imported only once a Triton kernel is about to run: it imports ``triton``.

Scores stay in natural-log units (``q·kᵀ·scale + mask``) and ``exp2`` is applied to
``(s − m)·log₂e``: folding log₂e into the scale would overflow the ``finfo.min`` additive masks
Hugging Face builds (−3.4e38·1.44 = −inf), and rows masked with ``finfo.min`` must stay uniform
as in eager softmax, while rows masked with −inf (or a boolean mask) give 0, as SDPA does.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


@triton.jit
def score_tile(q, k, mask_base, stride_mm, stride_mn, offs_m, offs_n, seq_q, seq_k, scale,
               MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """``q·kᵀ·scale + mask`` for a (BLOCK_M, BLOCK_N) tile; masked and out-of-range → −inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    inside = (offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k)
    if MASK_KIND == 1:
        keep = tl.load(mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                       mask=inside, other=0)
        inside = inside & (keep != 0)
    if MASK_KIND == 2:
        bias = tl.load(mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                       mask=inside, other=0.0)
        s = s + bias.to(tl.float32)
    if CAUSAL:  # top-left aligned, as SDPA's is_causal: key j is visible to query i when j <= i
        inside = inside & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(inside, s, float("-inf"))


@triton.jit
def dropout_keep(seed, row_offsets, offs_n, dropout_p):
    """Which (row, key) entries survive dropout: Philox numbers at a unique int64 offset each."""
    return tl.rand(seed, row_offsets[:, None] + offs_n[None, :]) >= dropout_p


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and launch width; interpreter runs use 16-wide blocks (cheap, tails exercised)."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def launch_config(head_dim: int, *, interpreted: bool, kind: str) -> LaunchConfig:
    """Untuned heuristics after the Triton tutorial's H100 settings (no GPU has measured them here)."""
    d = block_d(head_dim)
    if interpreted:
        return LaunchConfig(16, 16, d, 1, 1)
    if kind == "fwd":
        if d <= 64:
            return LaunchConfig(128, 64, d, 4, 3)
        if d <= 128:
            return LaunchConfig(128, 64, d, 8, 3)
        return LaunchConfig(64, 32, d, 8, 2)
    if kind == "bwd_kv":  # BLOCK_N keys stay resident, BLOCK_M query rows stream
        return LaunchConfig(32, 128, d, 4, 3) if d <= 64 else LaunchConfig(32, 64, d, 8, 2)
    return LaunchConfig(128, 32, d, 4, 3) if d <= 64 else LaunchConfig(64, 32, d, 8, 2)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE products unless the user allowed TF32 for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def upcast_dots(dtype: torch.dtype, *, interpreted: bool) -> bool:
    """Triton's CPU interpreter multiplies bf16 as raw uint16 (garbage): upcast to fp32 there."""
    return interpreted and dtype == torch.bfloat16


@dataclass(frozen=True)
class MaskView:
    """A mask expanded (stride 0, no copy) to (batch, heads, seq_q, seq_k) for the kernels."""

    tensor: torch.Tensor
    kind: int
    strides: tuple[int, int, int, int]


def mask_view(attn_mask: torch.Tensor | None, shape: tuple[int, int, int, int],
              dummy: torch.Tensor) -> MaskView:
    if attn_mask is None:
        return MaskView(dummy, MASK_NONE, (0, 0, 0, 0))
    expanded = attn_mask.expand(shape)
    if expanded.dtype == torch.bool:
        expanded = expanded.view(torch.uint8)
        kind = MASK_BOOL
    else:
        kind = MASK_ADD
    return MaskView(expanded, kind, tuple(expanded.stride()))  # type: ignore[arg-type]


_TWINS: dict[tuple[Any, bool], Any] = {}


def _twin(function: Any, interpret: bool) -> Any:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    key = (function.fn, interpret)
    if key not in _TWINS:
        _TWINS[key] = InterpretedFunction(function.fn) if interpret else JITFunction(function.fn)
    return _TWINS[key]


@contextmanager
def launchable(kernel: Any, *, interpret: bool) -> Iterator[Any]:
    """The kernel, and every Triton library or helper function it calls, in the mode asked for now.

    ``@triton.jit`` fixes a function's mode (GPU or CPU interpreter) when its module is imported,
    and torch imports Triton early (``torch.utils.flop_counter`` does), often before a test sets
    TRITON_INTERPRET: ``tl.zeros``, ``tl.sum``, ``tl.rand`` are then GPU-only and the interpreter
    refuses to call them. For the launch, functions of the other mode are swapped for twins of
    the right one; when everything already matches (the usual case) nothing changes.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    wrong = JITFunction if interpret else InterpretedFunction
    swapped = []
    for module in (tl, tl.core, tl.standard, tl.random, tl.math, sys.modules[__name__]):
        for name, value in list(vars(module).items()):
            if isinstance(value, wrong):
                swapped.append((module, name, value))
                setattr(module, name, _twin(value, interpret))
    try:
        yield _twin(kernel, interpret) if isinstance(kernel, wrong) else kernel
    finally:
        for module, name, value in swapped:
            setattr(module, name, value)

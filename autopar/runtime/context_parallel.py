"""Context parallelism: load-balanced sequence sharding and ring attention over P2P.

Data flow: a Plan with ``cp > 1`` shards every sequence-long activation of a layer over the cp
ranks of its mesh axis (:func:`shard_sequence`, with :func:`context_parallel_position_ids` giving
each rank the global positions of its tokens); everything but attention is token-local, so only
attention needs the other ranks' tokens: :func:`ring_attention` passes K/V blocks around the cp
ring (Liu et al. 2023, "Ring Attention with Blockwise Transformers") and merges the partial
outputs with their log-sum-exp (:func:`merge_partial_attention`, as FlashAttention does across
key blocks). :func:`unshard_sequence` gathers a sharded tensor back in sequence order.

Layout (load-balanced causal sharding, the "zigzag" of Llama 3 §3.3.2 and Brandon et al. 2023,
"Striped Attention"): the sequence is cut into ``2·cp`` equal chunks and cp rank ``r`` holds
chunks ``r`` and ``2·cp−1−r``. Under a causal mask every rank then has the same work: at its own
step a causal block over its two chunks, at each other step one unmasked block of half the size
(:func:`ring_block` derives which from the chunks' global positions).

Why not ``torch.distributed.tensor.experimental.context_parallel``: on CPU (gloo) it fails with
"aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding strategy
registered" (measured on 2 gloo ranks, issue 18), and it requires user code to call SDPA. This
ring is plain PyTorch over ``torch.distributed`` P2P (``batch_isend_irecv``: gloo on CPU, NCCL on
GPU) and runs on both. The block computation is a parameter (:class:`BlockAttention`): plain
torch math (:data:`TORCH_BLOCK_ATTENTION`, exact in fp32) by default, or the Triton
FlashAttention-2 kernels of ``autopar.kernels`` (:data:`FLASH_BLOCK_ATTENTION`), which return the
log-sum-exp the merge needs; pick it where ``autopar.kernels.attention.supports(q, k, v)``.

The block kernels and the merge live in ``autopar.kernels.ring_blocks`` (re-exported here), where
the local cost model's calibration times them too.

Layer: ``runtime`` (mechanism); imports only ``torch`` and ``autopar.kernels``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from autopar.kernels.ring_blocks import (  # noqa: F401 - re-exported: the runtime's block kernels
    FLASH_BLOCK_ATTENTION,
    TORCH_BLOCK_ATTENTION,
    BlockAttention,
    merge_partial_attention,
)

# ---------------------------------------------------------------------------------------------
# Load-balanced layout

def check_sequence_divisible(seq_len: int, *, cp: int) -> None:
    """Raise ValueError unless ``seq_len`` splits into ``2·cp`` equal chunks."""
    if type(cp) is not int or cp < 1:
        raise ValueError(f"cp = {cp!r}: expected an int >= 1")
    chunks = 2 * cp
    if seq_len % chunks:
        padded = -(-seq_len // chunks) * chunks
        raise ValueError(
            f"sequence length {seq_len} does not split into 2·cp = {chunks} equal chunks (cp {cp}): "
            f"pad the sequence to a multiple of {chunks} (e.g. {padded}) or choose a cp with "
            f"2·cp dividing {seq_len}")


def chunk_ids(rank: int, *, cp: int) -> tuple[int, int]:
    """The two sequence chunks (of ``2·cp``) that cp rank ``rank`` holds: ``(rank, 2·cp−1−rank)``."""
    if not 0 <= rank < cp:
        raise ValueError(f"rank {rank} is outside the cp group 0..{cp - 1}")
    return rank, 2 * cp - 1 - rank


def context_parallel_position_ids(seq_len: int, *, cp: int, rank: int,
                                  device: torch.device | str | None = None) -> Tensor:
    """Global positions (int64, ``seq_len / cp`` of them, increasing) of this rank's tokens."""
    check_sequence_divisible(seq_len, cp=cp)
    size = seq_len // (2 * cp)
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device)
                      for c in chunk_ids(rank, cp=cp)])


def shard_sequence(x: Tensor, *, dim: int, cp: int, rank: int) -> Tensor:
    """This rank's tokens of ``x`` along ``dim``: chunks ``rank`` and ``2·cp−1−rank`` (a copy)."""
    positions = context_parallel_position_ids(x.shape[dim], cp=cp, rank=rank, device=x.device)
    return x.index_select(dim, positions)


def unshard_sequence(local: Tensor, *, dim: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """The full tensor, in sequence order, from every cp rank's shard (an all-gather; not
    differentiable: for outputs, checkpoints and tests — training reduces the loss over cp)."""
    cp = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    seq_len = local.shape[dim] * cp
    order = torch.cat([context_parallel_position_ids(seq_len, cp=cp, rank=r, device=local.device)
                       for r in range(cp)])  # gathered index → global position
    return torch.cat(parts, dim=dim).index_select(dim, torch.argsort(order))


@dataclass(frozen=True)
class RingBlock:
    """What one ring step computes: the local query chunks ``q_chunks`` (0 = head, 1 = tail
    chunk) against the received key chunks ``kv_chunks``, with a top-left causal mask if
    ``causal``."""

    q_chunks: slice
    kv_chunks: slice
    causal: bool


def ring_block(*, rank: int, source: int, cp: int, causal: bool) -> RingBlock | None:
    """The block rank ``rank`` computes against the K/V of rank ``source`` (None: all in the future).

    Derived from the chunks' global positions: a key chunk before the query chunk is fully
    visible, the same chunk is the causal diagonal, a later one is skipped. The visible pairs
    always form one rectangle (asserted), so a step is one kernel call.
    """
    if not causal:
        return RingBlock(slice(0, 2), slice(0, 2), False)
    q_ids, k_ids = chunk_ids(rank, cp=cp), chunk_ids(source, cp=cp)
    visible = {(a, j) for a, qa in enumerate(q_ids) for j, kj in enumerate(k_ids) if kj <= qa}
    if not visible:
        return None
    rows, cols = sorted({a for a, _ in visible}), sorted({j for _, j in visible})
    diagonal = any(q_ids[a] == k_ids[j] for a, j in visible)
    if diagonal:  # own chunks: local positions increase, so top-left causal is exactly pos_q >= pos_k
        assert rank == source and rows == cols == [0, 1], (rank, source, visible)
    else:
        assert visible == {(a, j) for a in rows for j in cols}, (rank, source, visible)
    return RingBlock(slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1), diagonal)


# ---------------------------------------------------------------------------------------------
# The ring

@dataclass(frozen=True)
class _Ring:
    group: dist.ProcessGroup | None
    rank: int
    size: int

    @classmethod
    def of(cls, group: dist.ProcessGroup | None) -> _Ring:
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def _peer(self, offset: int) -> int:
        group_rank = (self.rank + offset) % self.size
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def exchange(self, send: Tensor, recv: Tensor) -> list[Any]:
        """Post: ``send`` to the next rank, ``recv`` from the previous one; returns the works."""
        ops = [dist.P2POp(dist.isend, send, self._peer(1), self.group),
               dist.P2POp(dist.irecv, recv, self._peer(-1), self.group)]
        return dist.batch_isend_irecv(ops)

    def source(self, step: int) -> int:
        """Whose K/V this rank holds at ``step``."""
        return (self.rank - step) % self.size


def _wait(works: list[Any]) -> None:
    for work in works:
        work.wait()


def _span(chunks: slice, local_seq: int) -> slice:
    """The local token rows of ``chunks`` (each rank's two chunks are local_seq / 2 long)."""
    size = local_seq // 2
    return slice(chunks.start * size, chunks.stop * size)


def _ring_forward(q: Tensor, k: Tensor, v: Tensor, ring: _Ring, *, causal: bool, scale: float,
                  block: BlockAttention) -> tuple[Tensor, Tensor]:
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    kv, incoming = torch.stack([k, v]), torch.empty((2, *k.shape), dtype=k.dtype, device=k.device)
    for step in range(ring.size):
        pending = ring.exchange(kv, incoming) if step < ring.size - 1 else []  # overlaps the compute
        todo = ring_block(rank=ring.rank, source=ring.source(step), cp=ring.size, causal=causal)
        if todo is not None:
            rows, cols = _span(todo.q_chunks, q.shape[2]), _span(todo.kv_chunks, q.shape[2])
            part_out, part_lse = block.forward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                                               causal=todo.causal, scale=scale)
            out[:, :, rows], lse[:, :, rows] = merge_partial_attention(
                out[:, :, rows], lse[:, :, rows], part_out.float(), part_lse.float())
        _wait(pending)
        kv, incoming = incoming, kv
    return out, lse


def _ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, ring: _Ring, *,
                   causal: bool, scale: float, block: BlockAttention) -> tuple[Tensor, Tensor, Tensor]:
    """K/V rotate as in the forward; the fp32 dK/dV accumulator of each block travels with it and,
    after the last step, one more hop brings it home to its owner."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv, incoming = torch.stack([k, v]), torch.empty((2, *k.shape), dtype=k.dtype, device=k.device)
    dkv = torch.zeros((2, *k.shape), dtype=torch.float32, device=k.device)
    dkv_incoming, dkv_pending = torch.empty_like(dkv), []
    for step in range(ring.size):
        pending = ring.exchange(kv, incoming) if step < ring.size - 1 else []
        todo = ring_block(rank=ring.rank, source=ring.source(step), cp=ring.size, causal=causal)
        grads = None
        if todo is not None:
            rows, cols = _span(todo.q_chunks, q.shape[2]), _span(todo.kv_chunks, q.shape[2])
            grads = block.backward(dout[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                                   out[:, :, rows], lse[:, :, rows], causal=todo.causal, scale=scale)
            dq[:, :, rows] += grads[0]
        if step > 0:  # this block's accumulator, sent on by the previous rank during our compute
            _wait(dkv_pending)
            dkv, dkv_incoming = dkv_incoming, dkv
        if grads is not None:
            dkv[0][:, :, cols] += grads[1]
            dkv[1][:, :, cols] += grads[2]
        if ring.size > 1:
            dkv_pending = ring.exchange(dkv, dkv_incoming)
        _wait(pending)
        kv, incoming = incoming, kv
    if ring.size > 1:
        _wait(dkv_pending)
        dkv = dkv_incoming
    return dq, dkv[0], dkv[1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None, causal: bool,
                scale: float, block: BlockAttention) -> Tensor:
        ring = _Ring.of(group)
        out, lse = _ring_forward(q, k, v, ring, causal=causal, scale=scale, block=block)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (ring, causal, scale, block)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        ring, causal, scale, block = ctx.settings
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, ring, causal=causal, scale=scale,
                                    block=block)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"ring_attention expects (batch, heads, local_seq, head_dim) tensors, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"ring_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must match q "
                         f"{tuple(q.shape)} in batch, local_seq and head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"ring_attention: {q.shape[1]} query heads are not a multiple of "
                         f"{k.shape[1]} key/value heads")
    if q.shape[2] % 2:
        raise ValueError(f"ring_attention: local_seq {q.shape[2]} is odd; each rank holds two equal "
                         "chunks (shard with autopar.runtime.context_parallel.shard_sequence)")


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group: dist.ProcessGroup | None, causal: bool,
                   scale: float | None = None, block: BlockAttention = TORCH_BLOCK_ATTENTION) -> Tensor:
    """Attention of this rank's queries over the whole sequence's keys, on the cp ``group``.

    q (b, h, local_seq, d) and k, v (b, h_kv, local_seq, d), ``h % h_kv == 0`` (grouped-query
    attention repeats K/V heads inside the block kernel; only h_kv heads travel), laid out by
    :func:`shard_sequence`; ``group`` None means the default group. Returns (b, h, local_seq, d)
    in q's dtype, equal to full attention's rows for this rank's positions. The forward issues
    ``cp − 1`` P2P exchanges (each posted before the block it overlaps is computed), the
    backward ``cp − 1`` of K/V plus ``cp`` of fp32 dK/dV.
    """
    _check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, group, causal, scale, block)

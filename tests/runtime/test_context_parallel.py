"""Context parallelism (autopar.runtime.context_parallel): the load-balanced layout, the block and
log-sum-exp merge math in one process, and ring attention on 2 and 4 real gloo ranks against full
single-process attention (tests/helpers/distributed/context_parallel_workers.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from autopar.kernels.attention import triton_available
from autopar.runtime import context_parallel as cpar
from autopar.runtime import spawn
from tests.helpers.distributed import context_parallel_workers as workers

TOL = workers.TOL


def _qkv(seed: int, *, heads: int = 4, kv_heads: int = 2, seq: int = 12, head_dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, seq, head_dim, generator=g)
    return q, *(torch.randn(2, kv_heads, seq, head_dim, generator=g) for _ in range(2))


def _block_mask(block: cpar.RingBlock | None, size: int) -> torch.Tensor:
    """The (2·size, 2·size) keep-mask a RingBlock computes over local query/key rows."""
    mask = torch.zeros(2 * size, 2 * size, dtype=torch.bool)
    if block is not None:
        rows = slice(block.q_chunks.start * size, block.q_chunks.stop * size)
        cols = slice(block.kv_chunks.start * size, block.kv_chunks.stop * size)
        inside = mask[rows, cols]
        mask[rows, cols] = torch.ones_like(inside).tril() if block.causal else True
    return mask


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 5])
def test_ring_blocks_are_exactly_the_causal_mask_and_balanced(cp):
    size, seq = 3, 6 * cp
    work = []
    for rank in range(cp):
        positions = cpar.context_parallel_position_ids(seq, cp=cp, rank=rank)
        assert positions.shape == (seq // cp,) and bool((positions.diff() > 0).all())
        visible = 0
        for source in range(cp):
            keys = cpar.context_parallel_position_ids(seq, cp=cp, rank=source)
            mask = _block_mask(cpar.ring_block(rank=rank, source=source, cp=cp, causal=True), size)
            assert torch.equal(mask, positions[:, None] >= keys[None, :]), (rank, source)
            everything = _block_mask(cpar.ring_block(rank=rank, source=source, cp=cp, causal=False), size)
            assert bool(everything.all())
            visible += int(mask.sum())
        work.append(visible)
    assert len(set(work)) == 1, work  # load balance: every rank computes the same number of scores
    tiled = torch.cat([cpar.context_parallel_position_ids(seq, cp=cp, rank=r) for r in range(cp)])
    assert torch.equal(tiled.sort().values, torch.arange(seq))


def test_shard_takes_the_rows_of_the_position_ids():
    x = torch.arange(2 * 16).view(2, 16)
    assert torch.equal(cpar.shard_sequence(x, dim=1, cp=2, rank=1), x[:, [4, 5, 6, 7, 8, 9, 10, 11]])
    assert cpar.shard_sequence(x, dim=1, cp=2, rank=0)[0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]


def test_an_indivisible_sequence_is_refused_with_the_fix():
    fix = r"sequence length 10 does not split into 2·cp = 4 .*cp 2.*multiple of 4 \(e.g. 12\)"
    with pytest.raises(ValueError, match=fix):
        cpar.shard_sequence(torch.zeros(1, 10), dim=1, cp=2, rank=0)
    with pytest.raises(ValueError, match="sequence length 9"):
        cpar.context_parallel_position_ids(9, cp=3, rank=0)
    with pytest.raises(ValueError, match="local_seq 5 is odd"):
        cpar.ring_attention(*_qkv(0, seq=5), group=None, causal=True)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2"):
        cpar.ring_attention(*_qkv(0, heads=3), group=None, causal=True)


def _blockwise(q, k, v, dout, blocks, *, scale):
    """Attention as a ring computes it, in one process: forward block by block merged by
    log-sum-exp, backward block by block from the merged (out, lse), gradients summed."""
    block = cpar.TORCH_BLOCK_ATTENTION
    out, lse = torch.zeros(q.shape), torch.full(q.shape[:-1], float("-inf"))
    for rows, cols, causal in blocks:
        part = block.forward(q[:, :, rows], k[:, :, cols], v[:, :, cols], causal=causal, scale=scale)
        merged = cpar.merge_partial_attention(out[:, :, rows], lse[:, :, rows], *part)
        out[:, :, rows], lse[:, :, rows] = merged
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    for rows, cols, causal in blocks:
        dq, dk, dv = block.backward(dout[:, :, rows], q[:, :, rows], k[:, :, cols], v[:, :, cols],
                                    out[:, :, rows], lse[:, :, rows], causal=causal, scale=scale)
        grads[0][:, :, rows] += dq
        grads[1][:, :, cols] += dk
        grads[2][:, :, cols] += dv
    return out, lse, grads


HEAD, TAIL, ALL = slice(0, 6), slice(6, 12), slice(0, 12)
BLOCKS = {True: [(HEAD, HEAD, True), (TAIL, TAIL, True), (TAIL, HEAD, False)],  # diagonals, then the past
          False: [(ALL, slice(0, 4), False), (ALL, slice(4, 12), False)]}


@pytest.mark.parametrize("causal", [True, False])
def test_blocks_merged_by_log_sum_exp_equal_full_attention(causal):
    """Keys split into blocks (causal: the two diagonal blocks masked, the past one full): the
    merged forward, the log-sum-exp and the per-block backward equal SDPA and autograd, with GQA."""
    q, k, v = _qkv(1)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*full, is_causal=causal, enable_gqa=True)
    expected.backward(dout)
    scale = 1 / math.sqrt(q.shape[-1])
    out, lse, grads = _blockwise(q, k, v, dout, BLOCKS[causal], scale=scale)
    torch.testing.assert_close(out, expected.detach(), **TOL)
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-2, -1)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), **TOL)
    for mine, ref in zip(grads, full, strict=True):
        torch.testing.assert_close(mine, ref.grad, **TOL)


def test_merge_keeps_the_other_side_for_rows_that_saw_no_key():
    out, block_out = torch.zeros(1, 3, 2), torch.randn(1, 3, 2)
    lse, block_lse = torch.full((1, 3), float("-inf")), torch.tensor([[0.5, float("-inf"), -1.0]])
    merged, merged_lse = cpar.merge_partial_attention(out, lse, block_out, block_lse)
    assert torch.equal(merged_lse, block_lse) and not merged.isnan().any()
    torch.testing.assert_close(merged[:, [0, 2]], block_out[:, [0, 2]])
    assert torch.equal(merged[:, 1], torch.zeros(1, 2))


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install autopar[triton])")
@pytest.mark.parametrize("causal", [True, False])
def test_the_flash_kernel_is_a_drop_in_block(causal, monkeypatch):
    """The Triton FlashAttention-2 hook (CPU interpreter here) returns what the torch block does."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = _qkv(3, seq=8, head_dim=16)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    ref_out, ref_lse = cpar.TORCH_BLOCK_ATTENTION.forward(q, k, v, causal=causal, scale=0.25)
    out, lse = cpar.FLASH_BLOCK_ATTENTION.forward(q, k, v, causal=causal, scale=0.25)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    wide = (dout, q, k, v, ref_out, ref_lse[:, :, :, None].expand(-1, -1, -1, 2)[..., 0])  # strided lse
    expected = cpar.TORCH_BLOCK_ATTENTION.backward(*wide, causal=causal, scale=0.25)
    for mine, ref in zip(cpar.FLASH_BLOCK_ATTENTION.backward(*wide, causal=causal, scale=0.25), expected,
                         strict=True):
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)  # the kernel's fp32 dots (tf32-free)


def test_ring_attention_on_two_gloo_ranks_equals_full_attention():
    spawn(workers.two_ranks, 2, timeout_s=60)


def test_ring_attention_on_four_gloo_ranks_and_in_subgroups():
    spawn(workers.four_ranks, 4, timeout_s=90)

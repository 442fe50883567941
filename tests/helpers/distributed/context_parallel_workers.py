"""Per-rank bodies of tests/runtime/test_context_parallel.py: ring attention on real gloo ranks
against full single-process attention (``scaled_dot_product_attention`` on the unsharded tensors),
the shard/unshard round trip, position ids, and the P2P exchanges each pass issues."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from autopar.cost_models.context_parallel import RingAttentionShape
from autopar.runtime import context_parallel as cpar

TOL = {"atol": 1e-5, "rtol": 1e-5}  # fp32: the ring reorders sums only (the 1e-5)


class CountingP2P:
    """Counts ``dist.batch_isend_irecv`` calls (one per ring exchange) and the bytes each sends
    while it is entered."""

    def __init__(self) -> None:
        self.calls = 0
        self.sent_bytes: list[int] = []
        self._original = dist.batch_isend_irecv

    def __enter__(self) -> CountingP2P:
        def counted(ops):
            self.calls += 1
            sends = [op.tensor for op in ops if op.op is dist.isend]
            self.sent_bytes += [t.numel() * t.element_size() for t in sends]
            return self._original(ops)

        dist.batch_isend_irecv = counted
        return self

    def __exit__(self, *_: object) -> None:
        dist.batch_isend_irecv = self._original


def _full_case(seed: int, *, batch: int, heads: int, kv_heads: int, seq: int, head_dim: int):
    g = torch.Generator().manual_seed(seed)  # the same on every rank
    q = torch.randn(batch, heads, seq, head_dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, seq, head_dim, generator=g) for _ in range(2))
    return q, k, v, torch.randn(batch, heads, seq, head_dim, generator=g)


def check_ring_attention(group, *, causal: bool, heads: int, kv_heads: int, seq: int,
                         scale: float | None = None, seed: int = 0) -> None:
    """Forward output and q/k/v gradients of the ring equal full attention's on this rank's rows;
    the forward issues cp − 1 exchanges, the backward 2·cp − 1 (none for cp 1); each rank sees
    seq / cp tokens."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, dout = _full_case(seed, batch=2, heads=heads, kv_heads=kv_heads, seq=seq, head_dim=8)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*full, is_causal=causal, scale=scale,
                                              enable_gqa=heads != kv_heads)
    expected.backward(dout)

    def shard(x: torch.Tensor) -> torch.Tensor:
        return cpar.shard_sequence(x, dim=2, cp=cp, rank=rank)

    local = [shard(t).requires_grad_() for t in (q, k, v)]
    assert all(t.shape[2] == seq // cp for t in local), [t.shape for t in local]
    with CountingP2P() as forward:
        out = cpar.ring_attention(*local, group=group, causal=causal, scale=scale)
    with CountingP2P() as backward:
        out.backward(shard(dout))
    expected_calls = (cp - 1, 2 * cp - 1 if cp > 1 else 0)  # backward: K/V cp − 1 times, dK/dV cp times
    assert (forward.calls, backward.calls) == expected_calls, (cp, forward.calls, backward.calls)
    priced = RingAttentionShape(microbatch_size=2, seq_len=seq, num_heads=heads, kv_heads=kv_heads,
                                head_dim=8, cp=cp, bytes_per_element=4)  # the cost model's bytes: those sent
    assert forward.sent_bytes == [priced.kv_block_bytes] * (cp - 1), forward.sent_bytes
    assert sorted(backward.sent_bytes) == sorted([priced.kv_block_bytes] * (cp - 1)
                                                 + [priced.grad_block_bytes] * (cp if cp > 1 else 0))
    torch.testing.assert_close(out, shard(expected), **TOL)
    for name, mine, ref in zip("qkv", local, full, strict=True):
        torch.testing.assert_close(mine.grad, shard(ref.grad), **TOL, msg=lambda m, n=name: f"d{n}: {m}")
    gathered = cpar.unshard_sequence(out.detach(), dim=2, group=group)
    torch.testing.assert_close(gathered, expected.detach(), **TOL)


def check_layout(group) -> None:
    """Shard, position ids and unshard agree: the positions are the rows shard takes, the ranks'
    positions tile the sequence, and unshard inverts shard."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    seq = 4 * cp
    x = torch.arange(3 * seq * 5, dtype=torch.float32).view(3, seq, 5)
    local = cpar.shard_sequence(x, dim=1, cp=cp, rank=rank)
    positions = cpar.context_parallel_position_ids(seq, cp=cp, rank=rank)
    assert torch.equal(local, x[:, positions]) and local.shape == (3, seq // cp, 5)
    gathered = cpar.unshard_sequence(positions, dim=0, group=group)
    assert torch.equal(gathered, torch.arange(seq)), gathered
    assert torch.equal(cpar.unshard_sequence(local, dim=1, group=group), x)


def two_ranks(rank: int, world: int) -> None:
    assert world == 2
    check_layout(None)
    for causal in (True, False):
        check_ring_attention(None, causal=causal, heads=4, kv_heads=2, seq=16)  # GQA
        check_ring_attention(None, causal=causal, heads=2, kv_heads=2, seq=12, scale=0.3, seed=1)
    alone = dist.new_subgroups(group_size=1)[0]  # cp = 1: plain attention, no exchange
    check_ring_attention(alone, causal=True, heads=2, kv_heads=1, seq=6)


def four_ranks(rank: int, world: int) -> None:
    assert world == 4
    check_layout(None)
    check_ring_attention(None, causal=True, heads=4, kv_heads=2, seq=16)
    pair = dist.new_subgroups(group_size=2)[0]  # cp = 2 inside a larger world: global peers
    check_ring_attention(pair, causal=True, heads=2, kv_heads=2, seq=8, seed=2)
    check_ring_attention(pair, causal=False, heads=4, kv_heads=1, seq=8, seed=3)

"""Context-parallel cost terms (autopar.cost_models.context_parallel): block bytes, the overlap of
ring transfers with block compute (compute-bound, transfer-bound, cp 1), links of a ring that spans
nodes, and the memory cp removes and adds. The runtime's bytes per exchange are checked against
these on gloo ranks (tests/runtime/test_context_parallel.py)."""

from __future__ import annotations

import pytest

from autopar.cluster import ClusterSpec
from autopar.cost_models.comm import Group, p2p_time_s
from autopar.cost_models.context_parallel import (
    RingAttentionShape,
    context_parallel_activation_bytes_per_layer,
    context_parallel_extra_bytes,
    ring_attention_backward_time_s,
    ring_attention_time_s,
    ring_attention_workspace_bytes,
    ring_exposed_time_s,
    ring_overlap_time_s,
)
from autopar.cost_models.memory import activation_bytes_per_layer

CLUSTER = ClusterSpec.parse("4x8xA100-80GB")
NV = CLUSTER.intra_node


def _shape(cp: int, **overrides) -> RingAttentionShape:
    fields = dict(microbatch_size=1, seq_len=8192, num_heads=32, kv_heads=8, head_dim=128, cp=cp)
    return RingAttentionShape(**(fields | overrides))


def test_block_bytes_follow_the_layout() -> None:
    shape = _shape(4)
    assert shape.local_seq_len == 2048
    assert shape.kv_block_bytes == 2 * 1 * 2048 * 8 * 128 * 2  # 2·b·(s/cp)·h_kv·d, bf16
    assert shape.grad_block_bytes == 2 * shape.kv_block_bytes  # fp32 dK/dV
    assert shape.lse_bytes == 1 * 32 * 2048 * 4


def test_cp1_costs_nothing_extra() -> None:
    shape, one = _shape(1), Group(size=1)
    assert ring_attention_time_s(shape, attention_forward_s=0.3, group=one, cluster=CLUSTER) == 0.3
    assert ring_attention_backward_time_s(shape, attention_backward_s=0.7, group=one, cluster=CLUSTER) == 0.7
    assert ring_exposed_time_s(shape, attention_forward_s=0.3, attention_backward_s=0.7, group=one,
                               cluster=CLUSTER) == 0.0
    assert context_parallel_extra_bytes(shape, num_layers_in_flight=10) == 0.0
    assert ring_attention_workspace_bytes(shape) == 0.0


def test_overlap_hides_the_smaller_of_compute_and_transfer() -> None:
    assert ring_overlap_time_s(step_compute_s=2.0, step_transfer_s=0.5, num_steps=4) == 8.0
    assert ring_overlap_time_s(step_compute_s=0.5, step_transfer_s=2.0, num_steps=4) == 3 * 2.0 + 0.5
    assert ring_overlap_time_s(step_compute_s=0.5, step_transfer_s=2.0, num_steps=1) == 0.5


def test_compute_bound_ring_hides_every_transfer_but_the_last_gradient_hop() -> None:
    shape, group = _shape(4), Group(size=4)
    forward_s, backward_s = 8.0, 16.0  # per step 0.5 s and 1 s: far above a ~70 µs transfer
    assert ring_attention_time_s(shape, attention_forward_s=forward_s, group=group,
                                 cluster=CLUSTER) == pytest.approx(forward_s / 4)
    last_hop = p2p_time_s(shape.grad_block_bytes, cluster=CLUSTER, same_node=True)
    exposed = ring_exposed_time_s(shape, attention_forward_s=forward_s, attention_backward_s=backward_s,
                                  group=group, cluster=CLUSTER)
    assert exposed == pytest.approx(last_hop)


def test_transfer_bound_ring_exposes_each_transfer_beyond_a_step() -> None:
    shape, group = _shape(4), Group(size=4)
    forward_s = backward_s = 1.6e-6  # 0.1 µs per step
    step = forward_s / 16
    kv = shape.kv_block_bytes / NV.bandwidth_bytes_per_s + NV.latency_s
    grad = shape.grad_block_bytes / NV.bandwidth_bytes_per_s + NV.latency_s
    assert ring_attention_time_s(shape, attention_forward_s=forward_s, group=group,
                                 cluster=CLUSTER) == pytest.approx(3 * kv + step)
    assert ring_attention_backward_time_s(shape, attention_backward_s=backward_s, group=group,
                                          cluster=CLUSTER) == pytest.approx(3 * (kv + grad) + step + grad)
    exposed = ring_exposed_time_s(shape, attention_forward_s=forward_s, attention_backward_s=backward_s,
                                  group=group, cluster=CLUSTER)
    assert exposed == pytest.approx(3 * (2 * kv + grad) + grad - 6 * step)  # less the compute share, 8 steps


def test_a_ring_across_nodes_steps_at_the_inter_node_pace() -> None:
    shape = _shape(8)
    inside = ring_attention_time_s(shape, attention_forward_s=0.0, group=Group(size=8), cluster=CLUSTER)
    across = ring_attention_time_s(shape, attention_forward_s=0.0, group=Group(size=8, num_nodes=2),
                                   cluster=CLUSTER)
    ib = CLUSTER.inter_node
    assert across == pytest.approx(7 * (shape.kv_block_bytes / ib.bandwidth_bytes_per_s + ib.latency_s))
    assert across > inside


def test_activations_shrink_by_cp_and_the_extras_are_named() -> None:
    shape = _shape(4)
    full = activation_bytes_per_layer(seq_len=8192, microbatch_size=1, hidden_size=4096, num_heads=32,
                                      fused_attention=True)
    assert context_parallel_activation_bytes_per_layer(shape, hidden_size=4096) == pytest.approx(full / 4)
    workspace = 2 * shape.kv_block_bytes + 2 * shape.grad_block_bytes + 32 * 2048 * 128 * 4
    assert ring_attention_workspace_bytes(shape) == workspace
    assert context_parallel_extra_bytes(shape, num_layers_in_flight=6) == 6 * shape.lse_bytes + workspace
    assert context_parallel_extra_bytes(shape, num_layers_in_flight=6, recompute="full") == (
        shape.lse_bytes + workspace)


def test_shapes_and_groups_are_checked() -> None:
    with pytest.raises(ValueError, match=r"sequence length 100 does not split into 2·cp = 8"):
        _shape(4, seq_len=100)
    with pytest.raises(ValueError, match="32 heads are not a multiple of 5"):
        _shape(4, kv_heads=5)
    with pytest.raises(ValueError, match="cp group of 2 ranks for a shape with cp 4"):
        ring_attention_time_s(_shape(4), attention_forward_s=1.0, group=Group(size=2), cluster=CLUSTER)

"""Communication model: ring formulas, hierarchical groups, TP volume, DP sync and overlap."""

from __future__ import annotations

import pytest

from autopar.cluster import ClusterSpec
from autopar.cost_models.comm import (
    Group,
    all_gather_time_s,
    all_reduce_time_s,
    all_to_all_time_s,
    broadcast_time_s,
    dp_sync_time_s,
    exposed_dp_time_s,
    p2p_time_s,
    pipeline_p2p_time_s,
    reduce_scatter_time_s,
    ring_all_reduce_time_s,
    tp_volume_elements_per_layer,
)

CLUSTER = ClusterSpec.parse("4x8xA100-80GB")
NV, IB = CLUSTER.intra_node, CLUSTER.inter_node
S = 1e9


def test_ring_formulas_inside_a_node() -> None:
    node = Group(size=8)
    assert all_reduce_time_s(S, group=node, cluster=CLUSTER) == pytest.approx(
        2 * 7 / 8 * S / NV.bandwidth_bytes_per_s + 2 * 7 * NV.latency_s)
    gather = 7 / 8 * S / NV.bandwidth_bytes_per_s + 7 * NV.latency_s
    assert reduce_scatter_time_s(S, group=node, cluster=CLUSTER) == pytest.approx(gather)
    assert all_gather_time_s(S, group=node, cluster=CLUSTER) == pytest.approx(gather)
    assert all_to_all_time_s(S, group=node, cluster=CLUSTER) == pytest.approx(gather)
    assert broadcast_time_s(S, group=node, cluster=CLUSTER) == pytest.approx(
        S / NV.bandwidth_bytes_per_s + 7 * NV.latency_s)
    assert p2p_time_s(S, cluster=CLUSTER, same_node=True) == S / NV.bandwidth_bytes_per_s + NV.latency_s
    assert p2p_time_s(S, cluster=CLUSTER, same_node=False) == S / IB.bandwidth_bytes_per_s + IB.latency_s


def test_one_rank_costs_nothing() -> None:
    for fn in (all_reduce_time_s, reduce_scatter_time_s, all_gather_time_s, all_to_all_time_s,
               broadcast_time_s):
        assert fn(S, group=Group(size=1), cluster=CLUSTER) == 0.0
    assert ring_all_reduce_time_s(S, num_ranks=1, bandwidth_bytes_per_s=1.0, latency_s=1.0) == 0.0


def test_groups_spanning_nodes() -> None:
    across = Group(size=4, num_nodes=4)  # one rank per node: a ring on InfiniBand
    assert all_reduce_time_s(S, group=across, cluster=CLUSTER) == pytest.approx(
        2 * 3 / 4 * S / IB.bandwidth_bytes_per_s + 2 * 3 * IB.latency_s)
    both = Group(size=32, num_nodes=4)  # reduce-scatter in node, all-reduce S/8 across, all-gather
    inside = 7 / 8 * S / NV.bandwidth_bytes_per_s + 7 * NV.latency_s
    between = 2 * 3 / 4 * (S / 8) / IB.bandwidth_bytes_per_s + 2 * 3 * IB.latency_s
    assert all_reduce_time_s(S, group=both, cluster=CLUSTER) == pytest.approx(2 * inside + between)
    assert reduce_scatter_time_s(S, group=both, cluster=CLUSTER) == pytest.approx(
        inside + 3 / 4 * (S / 8) / IB.bandwidth_bytes_per_s + 3 * IB.latency_s)
    assert all_reduce_time_s(S, group=both, cluster=CLUSTER) < all_reduce_time_s(
        S, group=Group(size=32, num_nodes=32), cluster=ClusterSpec.parse("32x1xA100-80GB"))


def test_group_of_device_ids() -> None:
    assert Group.of(range(8), cluster=CLUSTER) == Group(size=8, num_nodes=1)
    assert Group.of((0, 8, 16, 24), cluster=CLUSTER) == Group(size=4, num_nodes=4)
    assert Group.of(range(0, 32, 2), cluster=CLUSTER).per_node == 4
    with pytest.raises(ValueError, match="num_nodes"):
        Group(size=2, num_nodes=3)


def test_tensor_parallel_volume_is_four_ring_all_reduces() -> None:
    b, s, h, t = 4, 2048, 6144, 8
    volume = tp_volume_elements_per_layer(microbatch_size=b, seq_len=s, hidden_size=h, tp=t)
    assert volume == 8 * b * s * h * (t - 1) / t
    assert volume == pytest.approx(4 * 2 * (t - 1) / t * b * s * h)  # 2 forward + 2 backward
    assert tp_volume_elements_per_layer(microbatch_size=b, seq_len=s, hidden_size=h, tp=1) == 0


def test_pipeline_scatter_gather() -> None:
    plain = pipeline_p2p_time_s(activation_bytes=S, tp=8, cluster=CLUSTER, same_node=False,
                                scatter_gather=False)
    split = pipeline_p2p_time_s(activation_bytes=S, tp=8, cluster=CLUSTER, same_node=False)
    assert split == pytest.approx(p2p_time_s(S / 8, cluster=CLUSTER, same_node=False)
                                  + all_gather_time_s(S, group=Group(size=8), cluster=CLUSTER))
    assert split < plain / 3


def test_dp_sync_by_zero_level() -> None:
    group, params = Group(size=32, num_nodes=4), 1e9
    all_reduce = all_reduce_time_s(2 * params, group=group, cluster=CLUSTER)
    sync = {zero: dp_sync_time_s(params, bytes_per_element=2, zero=zero, group=group, cluster=CLUSTER,
                                 num_microbatches=4) for zero in range(4)}
    assert sync[0] == all_reduce
    assert sync[1] == sync[2] == pytest.approx(all_reduce)  # reduce-scatter + all-gather = all-reduce
    assert sync[3] == pytest.approx(4 * 1.5 * all_reduce)


def test_dp_overlap_factor() -> None:
    assert exposed_dp_time_s(2.0, overlap=0.0, backward_window_s=10.0) == 2.0
    assert exposed_dp_time_s(2.0, overlap=1.0, backward_window_s=10.0) == 0.0
    assert exposed_dp_time_s(2.0, overlap=0.5, backward_window_s=10.0) == 1.0
    assert exposed_dp_time_s(2.0, overlap=1.0, backward_window_s=0.5) == 1.5  # capped by backward
    with pytest.raises(ValueError, match="dp_overlap"):
        exposed_dp_time_s(1.0, overlap=1.5, backward_window_s=1.0)

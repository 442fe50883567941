"""Mesh layout (autopar.runtime.layout) on a fake process group: for hand-written pp × dp × tp
(× ep) plans, which ranks form each axis's group, which stages a rank runs (interleaved and
V-shaped placements), its coordinates, and the expert-parallel groups built from the same grid."""

import itertools

import pytest
import torch
import torch.distributed as dist

from autopar.cluster import ClusterSpec
from autopar.plans import Mesh, Parallelism, Plan, Schedule, Stage
from autopar.runtime.expert_parallel import ExpertGroups
from autopar.runtime.layout import Layout, coordinates
from tests.helpers.fake_pg import fake_process_group


def _plan(*, pp: int, dp: int, tp: int, ep: int = 1, axis_names=("pp", "dp", "tp"),
          device_ids=None, stage_pp=None) -> Plan:
    """Stage k runs on the devices whose pp coordinate is ``stage_pp[k]`` (default: one stage per pp)."""
    sizes = {"pp": pp, "dp": dp, "tp": tp}
    shape = tuple(sizes[axis] for axis in axis_names)
    world = pp * dp * tp
    device_ids = tuple(range(world)) if device_ids is None else tuple(device_ids)
    by_pp: dict[int, list[int]] = {}
    for device, index in zip(device_ids, itertools.product(*map(range, shape)), strict=True):
        by_pp.setdefault(dict(zip(axis_names, index, strict=True)).get("pp", 0), []).append(device)
    stage_pp = tuple(range(pp)) if stage_pp is None else stage_pp
    virtual = len(stage_pp) // pp
    stages = tuple(Stage(index=k, first_node="", last_node="", layers=(k, k + 1), devices=tuple(by_pp[p]),
                         virtual_chunk=k // pp) for k, p in enumerate(stage_pp))
    schedule = Schedule(name="interleaved" if virtual > 1 else "1f1b", microbatch_size=1,
                        num_microbatches=2 * pp, virtual_stages=virtual)
    return Plan(model="hand", graph_fingerprint="x", cluster=ClusterSpec.parse(f"local:{world}"),
                global_batch_size=2 * pp * dp, seq_len=None,
                parallelism=Parallelism(dp=dp, tp=tp, pp=pp, ep=ep),
                mesh=Mesh(axis_names=tuple(axis_names), shape=shape, device_ids=device_ids),
                stages=stages, schedule=schedule)


def _layouts(plan: Plan) -> list[dict]:
    """Every rank's Layout, seen from that rank, with its groups as lists of global ranks."""
    seen = []
    for rank in range(plan.world_size):
        with fake_process_group(rank, plan.world_size):
            layout = Layout.build(plan, "cpu")
            groups = {axis: dist.get_process_group_ranks(layout.group(axis)) for axis in ("pp", "dp", "tp")}
            seen.append({"layout": layout, "groups": groups, "local": layout.local_stages()})
    return seen


def test_pp2_dp2_tp2_groups_and_coordinates():
    grid = torch.arange(8).reshape(2, 2, 2)  # (pp, dp, tp), row-major: rank = 4·pp + 2·dp + tp
    for rank, seen in enumerate(_layouts(_plan(pp=2, dp=2, tp=2))):
        p, d, t = (int(i) for i in torch.nonzero(grid == rank)[0])
        layout = seen["layout"]
        assert (layout.rank, layout.pp_rank, layout.dp_rank, layout.tp_rank) == (rank, p, d, t)
        assert seen["groups"] == {"pp": grid[:, d, t].tolist(), "dp": grid[p, :, t].tolist(),
                                  "tp": grid[p, d, :].tolist()}
        assert layout.stage_ranks == (0, 1) and seen["local"] == [p]
    rank5 = _layouts(_plan(pp=2, dp=2, tp=2))[5]["groups"]
    assert rank5 == {"pp": [1, 5], "dp": [5, 7], "tp": [4, 5]}


def test_mesh_axis_order_is_the_plans():
    """Axes listed (dp, pp): pipeline neighbours are adjacent ranks, replicas two apart."""
    seen = _layouts(_plan(pp=2, dp=2, tp=1, axis_names=("dp", "pp")))
    assert [s["groups"]["pp"] for s in seen] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [s["groups"]["dp"] for s in seen] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [s["groups"]["tp"] for s in seen] == [[0], [1], [2], [3]]
    assert [(s["layout"].pp_rank, s["layout"].dp_rank) for s in seen] == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_coordinates_follow_device_ids():
    plan = _plan(pp=2, dp=1, tp=2, device_ids=(3, 2, 1, 0))
    at = {device: dict(zip(("pp", "dp", "cp", "tp"), c, strict=True))
          for device, c in ((3, (0, 0, 0, 0)), (2, (0, 0, 0, 1)), (1, (1, 0, 0, 0)), (0, (1, 0, 0, 1)))}
    assert coordinates(plan) == at
    seen = _layouts(plan)
    assert [s["layout"].pp_rank for s in seen] == [1, 1, 0, 0]
    assert [s["local"] for s in seen] == [[1], [1], [0], [0]]


@pytest.mark.parametrize(("stage_pp", "local"), [
    ((0, 1, 0, 1), [[0, 2], [1, 3]]),  # interleaved: chunk k on pp rank k mod pp
    ((0, 1, 1, 0), [[0, 3], [1, 2]]),  # V-shaped (ZBV, DualPipeV)
])
def test_local_stages_of_two_chunks_per_rank(stage_pp, local):
    seen = _layouts(_plan(pp=2, dp=2, tp=1, stage_pp=stage_pp))
    assert seen[0]["layout"].stage_ranks == stage_pp
    by_pp = {s["layout"].pp_rank: s["local"] for s in seen}
    assert [by_pp[0], by_pp[1]] == local


def _expert_groups(plan: Plan) -> list[tuple[int, list[int] | None, list[int] | None]]:
    """Every rank's (ep rank, expert-parallel group, expert-data-parallel group)."""
    seen = []
    for rank in range(plan.world_size):
        with fake_process_group(rank, plan.world_size):
            layout = Layout.build(plan, "cpu")
            groups = ExpertGroups.build(layout.mesh.mesh, rank, plan.parallelism.ep)
            ranks = [None if g is None else dist.get_process_group_ranks(g)
                     for g in (groups.ep_group, groups.edp_group)]
            seen.append((groups.ep_rank, *ranks))
    return seen


def test_expert_groups_are_consecutive_data_parallel_ranks():
    """dp4 × ep2: experts split over ranks {0,1} and {2,3}; each slice's replicas {0,2} and {1,3}."""
    assert _expert_groups(_plan(pp=1, dp=4, tp=1, ep=2)) == [
        (0, [0, 1], [0, 2]), (1, [0, 1], [1, 3]), (0, [2, 3], [0, 2]), (1, [2, 3], [1, 3])]


def test_expert_groups_of_pp2_dp2_tp2_ep2():
    """ep = dp: the expert group is the rank's data-parallel group; no replicas to reduce over."""
    grid = torch.arange(8).reshape(2, 2, 2)
    for rank, (ep_rank, ep_group, edp_group) in enumerate(_expert_groups(_plan(pp=2, dp=2, tp=2, ep=2))):
        p, d, t = (int(i) for i in torch.nonzero(grid == rank)[0])
        assert (ep_rank, ep_group, edp_group) == (d, grid[p, :, t].tolist(), None)


def test_world_size_mismatch_shows_the_arithmetic():
    arithmetic = r"tp\(2\) × pp\(2\) × dp\(2\) = 8 ≠ world size 4"
    with fake_process_group(0, 4), pytest.raises(ValueError, match=arithmetic):
        Layout.build(_plan(pp=2, dp=2, tp=2), "cpu")


def test_expert_groups_need_ep_to_divide_dp():
    with fake_process_group(0, 3), pytest.raises(ValueError, match=r"ep = 2 must divide dp = 3"):
        ExpertGroups.build(torch.arange(3).reshape(1, 3, 1), 0, 2)


def test_expert_groups_stay_inside_a_context_parallel_slice():
    """dp2 × cp2 × ep2 on ranks (dp, cp) = 2·dp + cp: tokens of one cp slice are exchanged among its
    dp ranks ({0,2}, {1,3}); an expert slice's gradients are summed over its holders in both cp
    slices ({0,1}, {2,3})."""
    grid = torch.arange(4).reshape(1, 2, 2, 1)
    seen = []
    for rank in range(4):
        with fake_process_group(rank, 4):
            groups = ExpertGroups.build(grid, rank, 2)
            seen.append((groups.ep_rank, *(dist.get_process_group_ranks(g)
                                           for g in (groups.ep_group, groups.edp_group))))
    assert seen == [(0, [0, 2], [0, 1]), (0, [1, 3], [0, 1]), (1, [0, 2], [2, 3]), (1, [1, 3], [2, 3])]

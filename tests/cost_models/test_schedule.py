"""Schedule model and simulation: bubble fractions, closed forms, action lists, timelines."""

from __future__ import annotations

import itertools

import pytest

from autopar.cost_models.schedule import StageTimes, bubble_fraction, pipeline_time, rank_actions
from autopar.cost_models.simulate import EVENT_KINDS, simulate

CASES = [("gpipe", p, m, 1) for p, m in [(1, 4), (2, 4), (4, 8), (4, 4), (3, 7)]]
CASES += [("1f1b", p, m, 1) for p, m in [(1, 4), (2, 5), (4, 8), (4, 3), (8, 16)]]
CASES += [("interleaved", p, m, v) for p, m, v in [(2, 4, 2), (4, 8, 2), (4, 8, 3), (4, 4, 2), (4, 16, 4)]]
CASES += [("zero_bubble", p, m, 1) for p, m in [(2, 2), (2, 4), (4, 8), (4, 4), (8, 16)]]


def _uniform(schedule: str, p: int, v: int, *, forward: float = 1.0, backward: float = 2.0,
             send: float = 0.0, recompute: float = 0.0) -> list[StageTimes]:
    weight = 1.0 if schedule == "zero_bubble" else 0.0
    back = 1.0 if schedule == "zero_bubble" else backward
    n = p * v
    return [StageTimes(forward_s=forward, backward_s=back, backward_weight_s=weight, recompute_s=recompute,
                       send_forward_s=send if k < n - 1 else 0.0, send_backward_s=send if k > 0 else 0.0)
            for k in range(n)]


@pytest.mark.parametrize(("schedule", "p", "m", "v"), CASES)
def test_simulation_equals_the_closed_form_on_uniform_stages(schedule: str, p: int, m: int, v: int) -> None:
    stages = _uniform(schedule, p, v)
    closed = pipeline_time(stages, schedule=schedule, pp=p, num_microbatches=m, virtual_stages=v)
    timeline = simulate(stages, schedule=schedule, pp=p, num_microbatches=m, virtual_stages=v)
    assert timeline.total_s == pytest.approx(closed.total_s, rel=1e-12)
    chunk = stages[0].work_s
    if schedule in ("gpipe", "1f1b"):
        assert closed.total_s == pytest.approx((m + p - 1) * chunk)  # (m + p − 1)(t_f + t_b)
    ideal = m * v * chunk
    assert closed.bubble_s / ideal == pytest.approx(bubble_fraction(schedule, pp=p, num_microbatches=m,
                                                                    virtual_stages=v))


@pytest.mark.parametrize(("schedule", "p", "m", "v"), [c for c in CASES if c[1] > 1])
def test_simulation_with_sends_and_recompute_stays_within_two_percent(schedule, p, m, v) -> None:
    stages = _uniform(schedule, p, v, send=0.1, recompute=0.5)
    closed = pipeline_time(stages, schedule=schedule, pp=p, num_microbatches=m, virtual_stages=v)
    timeline = simulate(stages, schedule=schedule, pp=p, num_microbatches=m, virtual_stages=v)
    assert timeline.total_s == pytest.approx(closed.total_s, rel=0.02)


def test_bubble_fractions() -> None:
    assert bubble_fraction("gpipe", pp=8, num_microbatches=32) == 7 / 32
    assert bubble_fraction("1f1b", pp=8, num_microbatches=32) == 7 / 32
    assert bubble_fraction("interleaved", pp=8, num_microbatches=32, virtual_stages=4) == 7 / 128
    assert bubble_fraction("zero_bubble", pp=8, num_microbatches=32) == 7 / 96


def test_alpa_formula_for_uneven_stages() -> None:
    stages = [StageTimes(forward_s=f, backward_s=2 * f) for f in (1.0, 3.0, 2.0)]
    closed = pipeline_time(stages, schedule="1f1b", pp=3, num_microbatches=5)
    assert closed.total_s == pytest.approx(sum(3 * f for f in (1, 3, 2)) + 4 * 9)  # Σ t_i + (m−1) max t_j
    assert closed.critical_rank == 1
    simulated = simulate(stages, schedule="1f1b", pp=3, num_microbatches=5).total_s
    assert 0.9 * closed.total_s < simulated <= closed.total_s  # Alpa's form is an upper bound here


@pytest.mark.parametrize(("schedule", "p", "m", "v"), CASES)
def test_timeline_covers_every_rank_without_overlap(schedule: str, p: int, m: int, v: int) -> None:
    stages = _uniform(schedule, p, v, send=0.1, recompute=0.5)
    timeline = simulate(stages, schedule=schedule, pp=p, num_microbatches=m, virtual_stages=v)
    for rank in range(p):
        events = [e for e in timeline.events if e.rank == rank]
        assert events[0].start_s == 0 and events[-1].end_s == pytest.approx(timeline.total_s)
        for before, after in itertools.pairwise(events):
            assert after.start_s == pytest.approx(before.end_s)
        busy = timeline.seconds_by_kind(rank)
        assert busy["forward"] == pytest.approx(m * v * 1.0)
        assert busy["recompute"] == pytest.approx(m * v * 0.5)
        assert (busy["backward_weight"] > 0) == (schedule == "zero_bubble")
    assert {e.kind for e in timeline.events} <= set(EVENT_KINDS)
    assert p == 1 or timeline.seconds_by_kind()["recv"] > 0


@pytest.mark.parametrize(("schedule", "p", "m", "v"), CASES)
def test_action_lists_run_each_unit_once(schedule: str, p: int, m: int, v: int) -> None:
    seen = [a for r in range(p) for a in rank_actions(schedule, pp=p, rank=r, num_microbatches=m,
                                                      virtual_stages=v)]
    kinds = "FBW" if schedule == "zero_bubble" else "FB"
    assert sorted((a.kind, a.stage, a.microbatch) for a in seen) == sorted(
        itertools.product(kinds, range(p * v), range(m)))
    for r in range(p):
        assert all(a.stage % p == r for a in rank_actions(schedule, pp=p, rank=r, num_microbatches=m,
                                                          virtual_stages=v))


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match="multiple of pp"):
        rank_actions("interleaved", pp=4, rank=0, num_microbatches=6, virtual_stages=2)
    with pytest.raises(ValueError, match="schedule"):
        pipeline_time([StageTimes(forward_s=1, backward_s=1)], schedule="dualpipe", pp=1, num_microbatches=1)
    with pytest.raises(ValueError, match="stages"):
        pipeline_time([StageTimes(forward_s=1, backward_s=1)], schedule="1f1b", pp=2, num_microbatches=1)

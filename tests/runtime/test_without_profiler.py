"""A report's step is the unprofiled one; the profiler's split of it into phases is kept."""

from __future__ import annotations

import pytest

from autopar.runtime.measure import StepReport, without_profiler


def _report(**changes: object) -> StepReport:
    fields = dict(rank=0, stages=(0,), forward_s=(0.1,), backward_s=(0.2,), optimizer_s=0.05, comm_s=0.1,
                  bubble_s=0.05, p2p_wait_s=0.01, step_s=0.5, loss=1.0, peak_memory_bytes=1,
                  memory_kind="rss",
                  phases_s=(("forward", 0.1), ("backward", 0.2), ("dp_comm", 0.1), ("bubble", 0.05),
                            ("optimizer", 0.05)))
    return StepReport(**(fields | changes))


def test_times_scale_to_the_unprofiled_step_and_keep_their_split() -> None:
    profiled = _report()
    plain = without_profiler(profiled, 0.4)
    assert plain.step_s == 0.4 and plain.profiled_step_s == 0.5
    assert sum(x for _, x in plain.phases_s) == pytest.approx(0.4)
    assert plain.forward_s == pytest.approx((0.08,)) and plain.comm_s == pytest.approx(0.08)
    assert dict(plain.phases_s)["backward"] / dict(plain.phases_s)["forward"] == pytest.approx(2.0)
    assert without_profiler(_report(step_s=0.0), 0.4).step_s == 0.0  # nothing to scale

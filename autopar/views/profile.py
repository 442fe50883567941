"""Recover the model profile a Plan was made with, so views can show per-stage detail.

Data flow: Plan (from JSON) → :func:`recover_profile` → a ``ModelProfile`` or None, with one
sentence saying where it came from → ``views.model.build_view`` (per-stage times, memory
breakdowns, the simulated timeline).

A Plan stores no profile, and its schema is shared, so views do not add one. Instead, when
``plan.model`` is a zoo name (``autopar plan`` records its MODEL argument there) the profile
is rebuilt: analytically for a GPT (``ModelProfile.gpt``, instant even for 175B), by a
meta-device capture otherwise (BERT-large: ~0.4 s), transformed by the plan's recorded passes
when it has any (an MoE or random-LTD plan). Each dtype is tried and a profile is
kept only if ``cost_models.estimate`` reproduces the plan's predicted step time to 0.1 % — a
plan made with other cost options, with graph passes, or by an older cost model falls back
honestly instead of showing numbers its planner never saw. Without a profile, views draw
from the plan's own predictions (step-time breakdown, per-device peaks) and say so. Files
and ``module:callable`` specs are never loaded: a view does not run user code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from autopar.cost_models import ModelProfile, estimate
from autopar.plans import Plan

DTYPES = ("bf16", "fp16", "fp32")
MATCH_RTOL = 1e-3


@dataclass(frozen=True)
class Recovered:
    """A profile that reproduces the plan's prediction (or None) and how it was found."""

    profile: ModelProfile | None
    note: str


def _zoo_config(plan: Plan):  # -> ModelConfig | None
    from autopar.models import REGISTRY, get_config

    if plan.model not in REGISTRY or plan.model in ("gpt", "bert"):
        return None
    config = get_config(plan.model)
    if plan.seq_len is not None and plan.seq_len != config.seq_len:
        try:
            config = get_config(plan.model, seq_len=plan.seq_len)
        except (TypeError, ValueError):
            return None
    return config


def _candidates(plan: Plan, config) -> Iterator[ModelProfile]:
    """Profiles to try, cheapest first: the analytic GPT profile, then a meta-device capture
    transformed by the plan's recorded passes (MoE layers, token dropping), as the planner saw it."""
    from autopar.models import GPTConfig

    if isinstance(config, GPTConfig):
        yield from (ModelProfile.gpt(config, name=plan.model, dtype=dtype) for dtype in DTYPES)
        if not plan.passes:
            return
    from autopar import models
    from autopar.capture import capture
    from autopar.passes import PassContext, run_passes
    from autopar.passes.random_ltd import kept_fractions, ltd_profile
    from autopar.planning import plan_passes

    model = models.build(plan.model, device="meta", seq_len=config.seq_len)
    inputs, _ = models.example_batch(model, 1, config.seq_len)
    captured = capture(model, (inputs,))
    kept = None
    if plan.passes:
        try:
            gm = run_passes(captured.graph_module, plan_passes(plan), PassContext(captured=captured))
        except (TypeError, ValueError):
            if isinstance(config, GPTConfig):  # the analytic profiles were tried: nothing more to offer
                return
            raise
        kept = kept_fractions(gm)
    for dtype in DTYPES:
        profile = ModelProfile.from_captured(captured, batch_size=1, name=plan.model, dtype=dtype)
        yield ltd_profile(profile, kept) if kept else profile


def _reproduces(plan: Plan, profile: ModelProfile) -> bool:
    expected = plan.predicted.step_time_s
    try:
        got = estimate(plan, profile).step_time_s
    except (ValueError, TypeError, AssertionError, ZeroDivisionError):
        return False
    return expected is not None and got is not None and math.isclose(got, expected, rel_tol=MATCH_RTOL)


def recover_profile(plan: Plan) -> Recovered:
    """The profile of a zoo model that reproduces ``plan.predicted.step_time_s``, if any."""
    fallback = "per-stage numbers approximated from the plan's totals"
    if plan.predicted.step_time_s is None:
        return Recovered(None, f"the plan has no predicted step time; {fallback}")
    config = _zoo_config(plan)
    if config is None:
        return Recovered(None, f"model {plan.model!r} is not a zoo name; {fallback}")
    try:
        for profile in _candidates(plan, config):
            if _reproduces(plan, profile):
                return Recovered(profile, f"cost model re-run on zoo model {plan.model!r} ({profile.dtype}); "
                                          "it reproduces the plan's predicted step time")
    except Exception as error:  # noqa: BLE001 - a view degrades, it does not fail
        return Recovered(None, f"could not rebuild zoo model {plan.model!r} ({type(error).__name__}); "
                               f"{fallback}")
    return Recovered(None, f"the cost model no longer reproduces this plan's step time for zoo model "
                           f"{plan.model!r} (other cost options, passes or an older autopar); {fallback}")

"""``autopar.plan`` and ``autopar.estimate``: from a model to a Plan with predictions.

Data flow: model + example inputs → ``autopar.capture`` → ``ModelProfile`` (cost
models) → a Plan → ``cost_models.estimate`` fills ``plan.predicted``. Today the Plan
comes from the pinned choices (``fix=``) with the plain defaults of
``autopar.plans.pinned`` for anything not pinned — no search yet; the planner issue
adds the search behind this same function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from autopar.capture import Captured, capture, normalize_inputs
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import CostOptions, ModelProfile
from autopar.cost_models import estimate as estimate_predicted
from autopar.cost_models.estimate import estimate_plan
from autopar.plans import Plan, Predicted, graph_fingerprint
from autopar.plans.megatron import megatron_shardings
from autopar.plans.pinned import plan_from_fix


def _leading_dims(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int | None]:
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors:
        raise ValueError("example inputs hold no tensor with a batch dimension")
    first = tensors[0]
    return int(first.shape[0]), (int(first.shape[1]) if first.dim() > 1 else None)


def profile_of(captured: Captured) -> ModelProfile:
    """The cost model's summary of a capture (per-sequence FLOPs, shapes, parameters)."""
    batch, _ = _leading_dims(captured.example_args, captured.example_kwargs)
    return ModelProfile.from_captured(captured, batch_size=batch, name=captured.model_name)


def plan(
    model: nn.Module,
    example_inputs: Any,
    *,
    cluster: str | ClusterSpec,
    global_batch_size: int,
    fix: dict[str, Any] | Fix | None = None,
    example_kwargs: dict[str, Any] | None = None,
    options: CostOptions | None = None,
) -> Plan:
    """The Plan for ``model`` on ``cluster`` at ``global_batch_size``, with predictions.

    ``example_inputs`` is one example batch (any batch size; build the model on
    ``meta`` for large models). Pinned choices are kept; the rest take the documented
    defaults of ``autopar.plans.pinned`` until the planner's search lands.
    """
    spec = cluster if isinstance(cluster, ClusterSpec) else ClusterSpec.parse(cluster)
    pins = Fix.from_dict(fix)
    if type(global_batch_size) is not int or global_batch_size < 1:
        raise ValueError(f"global_batch_size = {global_batch_size!r} is invalid: expected an int >= 1")
    args, kwargs = normalize_inputs(example_inputs), dict(example_kwargs or {})
    captured = capture(model, args, example_kwargs=kwargs)
    _, seq_len = _leading_dims(args, kwargs)
    shardings = megatron_shardings(captured.graph_module, pins.tp or 1, vocab_parallel=(pins.pp or 1) == 1)
    pinned = plan_from_fix(captured.model_name, graph_fingerprint=graph_fingerprint(captured.graph_module),
                           num_layers=len(captured.layers), cluster=spec, fix=pins,
                           global_batch_size=global_batch_size, seq_len=seq_len, shardings=shardings)
    return estimate_plan(pinned, profile_of(captured), options=options)


def estimate(plan: Plan, model: nn.Module | ModelProfile | Captured, example_inputs: Any = None, *,
             options: CostOptions | None = None) -> Predicted:
    """Recompute a Plan's predictions for a model (a module with example inputs, a
    capture, or a ``ModelProfile``)."""
    if isinstance(model, ModelProfile):
        profile = model
    elif isinstance(model, Captured):
        profile = profile_of(model)
    elif isinstance(model, nn.Module):
        if example_inputs is None:
            raise ValueError("estimate(plan, model) needs example_inputs to capture the model")
        profile = profile_of(capture(model, example_inputs))
    else:
        raise TypeError("estimate needs an nn.Module (with example_inputs), a Captured or a "
                        f"ModelProfile, got {type(model).__name__}")
    return estimate_predicted(plan, profile, options=options)

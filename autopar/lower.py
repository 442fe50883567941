"""The lowering spine: a model and an example batch become a :class:`Program`, once.

Data flow: ``nn.Module`` + example batch → ``autopar.capture`` (annotated fx graph) → graph
passes (``autopar.passes.run_passes``, each once) → the cost model's profiles
(``ModelProfile``: the time profile after the passes' ``time_profile`` hooks, e.g. random-LTD's
kept fractions, and the memory profile at full length) → :class:`Program`. Everything downstream
takes a Program or a Plan and never captures again: ``autopar.plan``/``plan_search`` search it,
:func:`predict` prices a Plan on it (the one pricing path: the planner's final numbers,
``autopar.estimate`` and ``Compiled``'s plans), ``autopar.compile`` runs its graph (one device) or
hands it to the runtime (``autopar.runtime.Engine``), and ``autopar.transform`` returns its graph.
Costs scale with the batch dimension, so one Program prices every microbatch size; the runtime
captures once more only when it runs a microbatch other than the example batch
(``microbatch_size=``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from autopar.capture import Captured, LeafSpec, capture
from autopar.capture.batch import leading_dims, normalize_inputs, resize_batch
from autopar.cluster import ClusterSpec
from autopar.cost_models import CostOptions, ModelProfile
from autopar.cost_models import estimate as estimate_predicted
from autopar.passes import GraphPass, PassContext, check_passes, run_passes, time_profile
from autopar.plans import AppliedPass, Plan, Predicted, graph_fingerprint


@dataclass(frozen=True, kw_only=True)
class Program:
    """A model lowered once: its capture (whose ``graph_module`` is the transformed graph), the
    passes that ran and their records, the cost model's profiles, and the graph's fingerprint.

    ``profile`` prices time (random-LTD layers at their schedule's average kept length);
    ``memory_profile`` prices memory (every layer at full length: the schedule reaches it). Both are
    made on first use (a Program that is only run, on one device, never needs them), for ``cluster``
    in ``dtype`` (:func:`profile_of`). ``batch_size`` and ``seq_len`` are the example batch's leading
    dimensions.
    """

    captured: Captured
    passes: tuple[GraphPass, ...]
    applied: tuple[AppliedPass, ...]
    fingerprint: str
    batch_size: int
    seq_len: int | None
    cluster: ClusterSpec | None = None
    dtype: str | None = None

    @functools.cached_property
    def memory_profile(self) -> ModelProfile:
        """The cost model's summary of the transformed graph, every layer at full length."""
        return profile_of(self.captured, self.cluster, dtype=self.dtype)

    @functools.cached_property
    def profile(self) -> ModelProfile:
        """:attr:`memory_profile` as the passes change the time of a step (``time_profile`` hooks)."""
        return time_profile(self.memory_profile, self.graph_module, self.passes)

    @property
    def graph_module(self) -> fx.GraphModule:
        """The transformed, runnable graph (shares the model's parameters)."""
        return self.captured.graph_module

    @property
    def example_tokens(self) -> int:
        """Tokens in the example batch (batch × sequence, or the batch without a sequence)."""
        return self.batch_size * (self.seq_len or 1)


def lower(
    model: nn.Module,
    example_inputs: Any,
    *,
    passes: Sequence[GraphPass] = (),
    cluster: str | ClusterSpec | None = None,
    microbatch_size: int | None = None,
    dtype: str | None = None,
    example_kwargs: dict[str, Any] | None = None,
    frontend: str = "auto",
    leaf_modules: Iterable[LeafSpec] = (),
    step: int = 0,
    disabled: Sequence[str] = (),
) -> Program:
    """Capture ``model`` on the example batch, run ``passes`` once, and profile the result.

    ``microbatch_size`` cuts or repeats the example batch along its first dimension first (the
    runtime's microbatch). ``dtype`` is the training dtype the profile prices (:func:`profile_of`).
    """
    args, kwargs = normalize_inputs(example_inputs), dict(example_kwargs or {})
    if microbatch_size is not None:
        args, kwargs = resize_batch((args, kwargs), microbatch_size)
    batch, seq_len = leading_dims(args, kwargs)
    captured = capture(model, args, example_kwargs=kwargs, frontend=frontend,  # type: ignore[arg-type]
                       leaf_modules=leaf_modules)
    chosen = check_passes(passes)
    applied: tuple[AppliedPass, ...] = ()
    if chosen:
        ctx = PassContext(captured=captured, step=step, disabled=frozenset(disabled))
        gm = run_passes(captured.graph_module, chosen, ctx)
        captured = dataclasses.replace(captured, graph_module=gm)
        applied = tuple(AppliedPass(name=name, config=_json_config(config))
                        for name, config, _ in ctx.applied)
    ran = tuple(p for p in chosen if p.name in {a.name for a in applied})
    spec = ClusterSpec.parse(cluster) if isinstance(cluster, str) else cluster
    return Program(captured=captured, passes=ran, applied=applied, batch_size=batch, seq_len=seq_len,
                   fingerprint=graph_fingerprint(captured.graph_module), cluster=spec, dtype=dtype)


def profile_of(captured: Captured, cluster: str | ClusterSpec | None = None, *,
                dtype: str | None = None) -> ModelProfile:
    """The cost model's summary of a (transformed) capture, per sequence of its example batch.

    The training dtype, unless given: bf16 on GPU clusters (mixed precision, the Megatron-LM setting
    every published figure uses, whatever dtype the model was built in); the parameters' dtype on
    local CPU processes or without a cluster (what the runtime computes in there)."""
    spec = ClusterSpec.parse(cluster) if isinstance(cluster, str) else cluster
    if dtype is None and spec is not None and spec.device.name != "CPU":
        dtype = "bf16"
    batch, _ = leading_dims(captured.example_args, captured.example_kwargs)
    return ModelProfile.from_captured(captured, batch_size=batch, name=captured.model_name,
                                      **({"dtype": dtype} if dtype is not None else {}))


def with_fingerprint(plan: Plan, model: nn.Module, example_inputs: Any, *, passes: Sequence[GraphPass] = (),
                     example_kwargs: dict[str, Any] | None = None) -> Plan:
    """``plan`` (hand-written, or made for another batch) with the fingerprint of the graph the
    runtime will run: ``model`` lowered at the plan's microbatch size with ``passes``
    (``autopar.compile(..., plan=plan)`` checks it)."""
    program = lower(model, example_inputs, example_kwargs=example_kwargs, passes=passes,
                    microbatch_size=plan.schedule.microbatch_size)
    return dataclasses.replace(plan, graph_fingerprint=program.fingerprint)


def predict(plan: Plan, program: Program, *, options: CostOptions | None = None) -> Predicted:
    """The cost model's prediction of ``plan`` on ``program``: time on the time profile, peak memory
    on the memory profile (``cost_models.estimate``; the one pricing path)."""
    return estimate_predicted(plan, program.profile, options=options, memory_profile=program.memory_profile)


def predicted_plan(plan: Plan, program: Program, *, options: CostOptions | None = None) -> Plan:
    """``plan`` with ``predicted`` filled by :func:`predict`."""
    return dataclasses.replace(plan, predicted=predict(plan, program, options=options))


def _json_config(config: dict[str, Any]) -> dict[str, Any]:
    """A pass's config with values a Plan can store (tuples for sequences, repr otherwise)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, (list, tuple)):
            value = tuple(value)
        ok = isinstance(value, (str, int, bool, float, type(None), tuple))
        out[key] = value if ok else repr(value)
    return out

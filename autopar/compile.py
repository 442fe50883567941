"""``autopar.compile``: the user-facing entry, as a function and as a class decorator.

Data flow: ``compile(model, cluster, ...)`` → :class:`Compiled` (lazy) → the first
call captures (``autopar.capture``) and runs the graph passes (``passes=[...]``, e.g.
``autopar.passes.RandomLTD``) on the captured graph. On one device that graph runs as is.
On several, the first ``step`` turns the pinned choices (``fix=``) or a given
``plan=`` into a Plan and hands it with the transformed graph to the runtime
(``autopar.runtime.Engine``), inside the process group that ``autopar run`` or
``torchrun`` started. Passes with run-time state (random-LTD's schedule) follow the
compiled model's step counter and are saved with it (``autopar.runtime.pass_state``).
The MoE layers that ``autopar.passes.MoE`` creates in the first capture belong to the compiled
model (``compiled.moe``): trained, saved, and run by every later capture; the training loss
adds their auxiliary losses.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.profiler import record_function
from torch.utils._pytree import tree_flatten, tree_map

from autopar.capture import Captured, LeafSpec, capture, normalize_inputs
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models.estimate import estimate_plan
from autopar.losses import cross_entropy
from autopar.passes import GraphPass, MoE, PassContext, run_passes
from autopar.passes.moe import moe_aux_loss, moe_layers
from autopar.passes.moe_layer import MoEStats
from autopar.passes.random_ltd import kept_fractions, ltd_profile
from autopar.planning import profile_of
from autopar.plans import Plan, check_fingerprint, graph_fingerprint
from autopar.runtime.pass_state import PassStates, pass_state_tensors, resolve_passes, split_pass_state

if TYPE_CHECKING:
    from autopar.runtime.engine import Engine

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LossFn = Callable[[Any, Any], torch.Tensor]

log = logging.getLogger("autopar.compile")

DEFAULT_CLUSTER = "local:1"
MOE_PREFIX = "moe."  # the MoE layers' entries in a single-device ``compiled.state_dict()``
# profiler labels of a single-device step, read by autopar.runtime.report (stage 0)
FORWARD_LABEL, BACKWARD_LABEL = "autopar::forward::0", "autopar::backward::0"


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, lr 3e-4, weight decay 0.01: used when ``optimizer=`` is not given."""
    return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any], training: bool) -> Any:
    leaves, spec = tree_flatten((args, kwargs))
    described = tuple(
        (tuple(v.shape), v.dtype, v.device.type) if isinstance(v, torch.Tensor) else repr(v)
        for v in leaves
    )
    return (str(spec), described, training)


class Compiled(nn.Module):
    """A model compiled by autopar: call it like the model, train it with :meth:`step`.

    Parameters are the original model's (``compiled.module``); capture happens on
    the first call for each input signature (shapes, dtypes, train/eval), like
    ``torch.compile``, and ``passes`` run on every capture. ``passes=None`` takes the
    passes ``autopar run --random-ltd ...`` handed over, if any. Under a process group
    without ``plan=``, the planner (``autopar.plan``, at most ``time_limit_s``) chooses what
    ``fix=`` leaves open.

    With ``passes=[MoE(...)]``, the MoE layers the first capture creates (upcycled from the dense
    MLPs as they are then) are kept in :attr:`moe` (layer index → ``MoELayer``): they are in the
    optimizer, the state dict (``moe.<layer>.…``) and ``train()``/``eval()``, and every later
    capture (eval mode, other shapes) runs these same layers. The replaced dense MLPs stay in
    ``compiled.module``, unchanged and unused.
    """

    def __init__(
        self,
        model: nn.Module,
        cluster: str | ClusterSpec = DEFAULT_CLUSTER,
        *,
        loss_fn: LossFn | None = None,
        optimizer: OptimizerFactory | None = None,
        fix: dict[str, Any] | Fix | None = None,
        plan: Plan | None = None,
        frontend: str = "auto",
        leaf_modules: Iterable[LeafSpec] = (),
        passes: Sequence[GraphPass] | None = None,
        time_limit_s: float = 60.0,
    ) -> None:
        super().__init__()
        self.plan_time_limit_s = time_limit_s
        if not isinstance(model, nn.Module):
            raise TypeError(f"autopar.compile needs an nn.Module, got {type(model).__name__}")
        self.passes = tuple(resolve_passes(passes))
        self._pass_states = PassStates()
        self._passes_applied: tuple[str, ...] = ()
        self.module = model
        self.cluster = cluster if isinstance(cluster, ClusterSpec) else ClusterSpec.parse(cluster)
        self.fix = Fix.from_dict(fix)
        if plan is not None and not isinstance(plan, Plan):
            raise TypeError(f"plan must be an autopar.Plan, got {type(plan).__name__}")
        self._given_plan = plan
        self.distributed = _check_process_group(self.cluster, self.fix, plan)
        self._engine: Engine | None = None
        self.loss_fn: LossFn = loss_fn or cross_entropy
        self._optimizer_factory = optimizer or default_optimizer
        self._optimizer: torch.optim.Optimizer | None = None
        self._frontend = frontend
        self._leaf_modules = tuple(leaf_modules)
        self._graphs: dict[Any, Captured] = {}
        self.num_steps = 0
        self.moe = nn.ModuleDict()  # str(layer index) → MoELayer, filled by the first capture
        self._pending_moe_state: dict[str, Any] = {}
        self._moe_stats: dict[int, MoEStats | None] = {}

    def captured_for(self, *args: Any, **kwargs: Any) -> Captured:
        """The capture for this input signature (captured now if it is new)."""
        key = _signature(args, kwargs, self.training)
        if key not in self._graphs:
            captured = capture(
                self.module, args, example_kwargs=kwargs,
                frontend=self._frontend, leaf_modules=self._leaf_modules,  # type: ignore[arg-type]
            )
            self._graphs[key] = self._transformed(captured)
        return self._graphs[key]

    def _transformed(self, captured: Captured) -> Captured:
        if not self.passes:
            return captured
        ctx = PassContext(captured=captured, step=self.num_steps)
        gm = run_passes(captured.graph_module, self.passes, ctx)
        names = tuple(name for name, _, _ in ctx.applied)
        self._passes_applied = names
        self._pass_states.attach(gm, names)
        self._share_moe_layers(gm)
        return dataclasses.replace(captured, graph_module=gm) if gm is not captured.graph_module else captured

    def _share_moe_layers(self, gm: fx.GraphModule) -> None:
        """Adopt the first capture's MoE layers; in later captures, put them in place of the
        fresh copies that the pass upcycled from the (untrained) dense MLPs."""
        created = moe_layers(gm)
        if not created:
            return
        if not len(self.moe):
            for layer, module in sorted(created.items()):
                self.moe[str(layer)] = module.train(self.training)
            if self._pending_moe_state:
                self.moe.load_state_dict(self._pending_moe_state)
                self._pending_moe_state = {}
            if self._optimizer is not None:  # built before the first capture
                known = {id(p) for group in self._optimizer.param_groups for p in group["params"]}
                new = [p for p in self.moe.parameters() if id(p) not in known]  # adopted layers share some
                if new:
                    self._optimizer.add_param_group({"params": new})
            return
        assert set(created) == {int(k) for k in self.moe}, (sorted(created), list(self.moe))
        for path, module in list(gm.named_modules()):
            if module in created.values():
                gm.set_submodule(path, self.moe[str(module.layer)])

    def named_model_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter this model trains (what the optimizer holds), each once: the model's
        under its own names (``wte.weight``), then those the passes created under their paths in
        the graph (``blocks.1.mlp.moe.router.weight``, as the multi-device runtime names them)."""
        result = list(self.module.named_parameters())
        if self._graphs:
            known = {id(p) for _, p in result}
            first = next(iter(self._graphs.values())).graph_module
            result += [(name, p) for name, p in first.named_parameters() if id(p) not in known]
        return result

    def moe_stats(self) -> dict[int, MoEStats | None]:
        """MoE layer index → its expert load in the last training step (``MoEStats``: tokens,
        capacity, assignments routed to and computed by each expert, dropped assignments and
        tokens); ``{}`` without MoE layers. Multi-device: this rank's layers, last microbatch."""
        if self._engine is not None:
            return {m.layer: m.stats for m in self._engine.moe_layers()}
        return dict(self._moe_stats)

    @property
    def passes_applied(self) -> tuple[str, ...]:
        """Names of the passes that ran on the latest capture, in order (empty before it)."""
        return self._passes_applied

    @property
    def pass_state(self) -> dict[str, dict[str, int]]:
        """Pass name → its run-time state, e.g. ``{"random_ltd": {"step": 3, "microbatch": 0,
        "consumed_layer_tokens": 9216}}`` (ints; what checkpoints save)."""
        return self._pass_states.state_dict()

    @property
    def consumed_layer_tokens(self) -> int | None:
        """Layer-tokens of the steps taken (``B × (n_ltd × k + (L − n_ltd) × s)`` a step),
        counted by random-LTD; None without it."""
        state = self.pass_state.get("random_ltd")
        return None if state is None else state["consumed_layer_tokens"]

    def set_step(self, step: int) -> None:
        """Set the step counter (``num_steps``), which the passes' schedules follow from the next step."""
        if type(step) is not int or step < 0:
            raise ValueError(f"step = {step!r} is invalid: expected an int >= 0")
        self.num_steps = step

    def train(self, mode: bool = True) -> Compiled:
        """Training or evaluation mode, passes included (random-LTD keeps every token in eval,
        MoE layers use ``eval_capacity_factor``)."""
        super().train(mode)
        self._pass_states.train(mode)
        return self

    @property
    def captured(self) -> Captured:
        """The most recent capture; raises before the first call."""
        if not self._graphs:
            raise RuntimeError("nothing captured yet: call the compiled model or .step() first")
        return list(self._graphs.values())[-1]

    @property
    def engine(self) -> Engine:
        """The runtime engine of a multi-device run (built by the first ``step``)."""
        if self._engine is None:
            raise RuntimeError("no engine yet: the first .step() builds it (multi-device runs only)")
        return self._engine

    @property
    def plan(self) -> Plan:
        """The Plan being executed (the runtime's, or the single-device plan)."""
        if self._engine is not None:
            return self._engine.plan
        captured = self.captured
        first = next((t for t in tree_flatten((captured.example_args, captured.example_kwargs))[0]
                      if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        batch = int(first.shape[0]) if first is not None else 1
        seq_len = int(first.shape[1]) if first is not None and first.dim() > 1 else None
        first_node = next(iter(captured.graph_module.graph.nodes)).name
        last_node = list(captured.graph_module.graph.nodes)[-1].name
        plan = Plan.single_device(
            captured.model_name, graph_fingerprint=graph_fingerprint(captured.graph_module),
            cluster=self.cluster, global_batch_size=batch, seq_len=seq_len,
            num_layers=len(captured.layers),
        )
        stage = dataclasses.replace(plan.stages[0], first_node=first_node, last_node=last_node)
        return dataclasses.replace(plan, stages=(stage,))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.distributed:
            raise ValueError(
                "a model compiled for several devices runs through .step(inputs, targets); "
                "call compiled.module(...) for a local forward pass"
            )
        return self.captured_for(*args, **kwargs).graph_module(*args, **kwargs)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer, built from the factory on first use, over the model's parameters and
        the MoE layers' (added as a parameter group if they appear after it was built: make
        learning-rate schedulers after the first capture, or they miss that group)."""
        if self._optimizer is None:
            self._optimizer = self._optimizer_factory(self.parameters())
        return self._optimizer

    def step(self, inputs: Any, targets: Any) -> float:
        """One training step: forward, ``loss_fn(outputs, targets)``, backward, optimizer step.

        ``inputs`` is a tensor, a tuple of positional arguments, or a dict of keyword
        arguments. With MoE layers the loss is ``loss_fn(outputs, targets) + moe_aux_loss``
        (their weighted balance and z losses). Returns the loss as a float.
        """
        self.train()
        args, kwargs = _split_inputs(inputs)
        if self.distributed:
            if self._engine is None:
                self._engine = self._build_engine(args, kwargs)
            loss_value = self._engine.step(args, kwargs, targets, step=self.num_steps)
            self.num_steps += 1
            return loss_value
        gm = self.captured_for(*args, **kwargs).graph_module
        self._pass_states.begin_step(self.num_steps)
        optimizer = self.optimizer
        optimizer.zero_grad(set_to_none=True)
        with record_function(FORWARD_LABEL):
            loss = self.loss_fn(gm(*args, **kwargs), targets)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"loss_fn must return a scalar tensor, got {loss!r:.80}")
            if len(self.moe):
                loss = loss + moe_aux_loss(gm)
        with record_function(BACKWARD_LABEL):
            loss.backward()
        optimizer.step()
        self._moe_stats = {int(layer): module.stats for layer, module in self.moe.items()}
        self._pass_states.end_step(gm, _batch_size(args, kwargs))
        self.num_steps += 1
        return float(loss.detach())

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Under the runtime: the checkpoint state (parameters and optimizer state under the
        original model's names, DTensor shards kept as such; see ``autopar.save``).
        On one device: ``nn.Module.state_dict`` (the model's under ``module.``, MoE layers under
        ``moe.<layer>.``), plus each pass's state as int64 scalars under
        ``passes.<pass name>.<key>`` (e.g. ``passes.random_ltd.step``)."""
        if self._engine is None:
            result = super().state_dict(*args, **kwargs)
            prefix = kwargs.get("prefix", "")
            result.update({f"{prefix}{MOE_PREFIX}{k}": v for k, v in self._pending_moe_state.items()})
            result.update(pass_state_tensors(self.pass_state, prefix=prefix))
            return result
        from autopar.runtime.checkpoint import state_dict

        return state_dict(self)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; the ``passes.*`` entries restore the passes' state and
        the step counter (the schedule's step), so training resumes with the same token choices.
        Before the first capture, the ``moe.*`` entries wait for the MoE layers it creates; a state
        without them (a dense model's) makes those layers upcycle the loaded dense MLPs."""
        rest, states = split_pass_state(state_dict)
        if not len(self.moe) and any(isinstance(p, MoE) for p in self.passes):
            moe = [k for k in rest if k.startswith(MOE_PREFIX)]
            self._pending_moe_state = {k[len(MOE_PREFIX):]: rest.pop(k) for k in moe}
        result = super().load_state_dict(rest, strict=strict, assign=assign)
        self.load_pass_state(states)
        return result

    def load_pass_state(self, states: dict[str, dict[str, int]]) -> None:
        """Restore :attr:`pass_state`; the step counter follows a saved ``step``."""
        unknown = sorted(set(states) - {p.name for p in self.passes})
        if unknown:
            log.warning("state of pass(es) %s ignored: this model was compiled without them", unknown)
        states = {k: v for k, v in states.items() if k not in unknown}
        self._pass_states.load_state_dict(states)
        steps = {state["step"] for state in states.values() if "step" in state}
        if len(steps) == 1:
            self.num_steps = steps.pop()

    def report(self, inputs: Any, targets: Any) -> Any:
        """Run one measured training step and return a table of what each rank spent
        (forward, backward, communication, bubble, memory) beside the Plan's predictions,
        followed by the MoE layers' expert loads if there are any (``autopar.runtime.report``).
        On one device too; multi-device runs call it on every rank."""
        from autopar.runtime.report import report

        return report(self, inputs, targets)

    def _searched_plan(self, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int) -> Plan:
        """The planner's Plan (pins kept, the rest searched), made on rank 0 and sent to every
        rank as JSON bytes, so all ranks run the same Plan even if a search hit its time limit."""
        from autopar.planning import plan_search

        text = ""
        if not dist.is_initialized() or dist.get_rank() == 0:
            result = plan_search(self.module, args, cluster=self.cluster, global_batch_size=batch,
                                 fix=self.fix, example_kwargs=kwargs, passes=self.passes,
                                 time_limit_s=self.plan_time_limit_s)
            text = result.plan.to_json()
        if dist.is_initialized() and dist.get_world_size() > 1:
            text = _broadcast_text(text)
        return Plan.from_json(text)

    def _build_engine(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Engine:
        """Capture at the microbatch shape, take or make the Plan, start the runtime."""
        from autopar.runtime.engine import Engine  # torch.distributed.pipelining is slow to import

        batch = _batch_size(args, kwargs)
        plan = self._given_plan
        if plan is None:
            plan = self._searched_plan(args, kwargs, batch)
        if plan.global_batch_size != batch:
            raise ValueError(f"the plan is for a global batch of {plan.global_batch_size}, "
                             f"but step() got {batch}")
        micro = plan.schedule.microbatch_size
        captured = self.captured_for(*_slice(args, micro), **_slice(kwargs, micro))
        fingerprint = graph_fingerprint(captured.graph_module)
        if self._given_plan is None:
            plan = dataclasses.replace(plan, graph_fingerprint=fingerprint)
        else:
            check_fingerprint(plan, fingerprint)
        if plan.predicted.step_time_s is None:
            profile = profile_of(captured, plan.cluster_spec())
            profile = ltd_profile(profile, kept_fractions(captured.graph_module))
            plan = estimate_plan(plan, profile)
        return Engine(captured, plan, loss_fn=self.loss_fn, optimizer=self._optimizer_factory,
                      passes=self._pass_states)


def _broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank, as a length then UTF-8 bytes in tensors (no pickling)."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    dist.broadcast(size, src=0)
    if dist.get_rank() != 0:
        data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return bytes(data.tolist()).decode()


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors:
        raise ValueError("step() inputs hold no batched tensor; pass tensors with a batch dimension first")
    return int(tensors[0].shape[0])


def _seq_len(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 1]
    return int(tensors[0].shape[1]) if tensors else None


def _slice(values: Any, size: int) -> Any:
    return tree_map(lambda v: v[:size] if isinstance(v, torch.Tensor) and v.dim() > 0 else v, values)


def _split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    return normalize_inputs(inputs), {}


def _check_process_group(cluster: ClusterSpec, fix: Fix, plan: Plan | None) -> bool:
    """Whether the run is distributed; the process group must match the cluster."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    wanted = plan.world_size if plan is not None else cluster.num_devices
    if wanted != world:
        how = (f"`autopar run script.py --nproc {wanted}`" if cluster.local
               else f"torchrun with {wanted} processes in all")
        raise ValueError(
            f"cluster {cluster.text!r} has {cluster.num_devices} devices (plan: {wanted}) but this "
            f"process group has {world}; launch with {how}, or compile for cluster='local:{world}'"
        )
    if plan is None and wanted == 1 and fix.world_size() != 1:
        raise ValueError(f"fix={fix.pinned()} asks for dp×tp×pp = {fix.world_size()} devices "
                         f"but cluster {cluster.text!r} has 1")
    return wanted > 1


def compile(  # noqa: A001 - the public name mirrors torch.compile
    model: nn.Module | type[nn.Module] | None = None,
    cluster: str | ClusterSpec | None = None,
    **options: Any,
) -> Any:
    """Compile a model for (distributed) training.

    ``autopar.compile(model, cluster, loss_fn=..., optimizer=..., fix={...})`` returns a
    :class:`Compiled`. As a decorator, ``@autopar.compile(cluster=..., **options)`` (or
    bare ``@autopar.compile``) on an ``nn.Module`` subclass makes its constructor
    return a :class:`Compiled` wrapping the new instance.
    """
    spec = DEFAULT_CLUSTER if cluster is None else cluster
    if model is None:
        return lambda target: compile(target, spec, **options)
    if isinstance(model, type):
        if not issubclass(model, nn.Module):
            raise TypeError(f"@autopar.compile decorates nn.Module subclasses, got {model.__name__}")
        return _decorate(model, spec, options)
    return Compiled(model, spec, **options)


def _decorate(cls: type[nn.Module], cluster: str | ClusterSpec, options: dict[str, Any]) -> Any:
    ClusterSpec.parse(cluster) if isinstance(cluster, str) else cluster  # fail at decoration time

    @functools.wraps(cls, updated=())
    def construct(*args: Any, **kwargs: Any) -> Compiled:
        return Compiled(cls(*args, **kwargs), cluster, **options)

    construct.original_class = cls  # type: ignore[attr-defined]
    return construct

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

import copy
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from autopar.capture import Captured, LeafSpec
from autopar.capture.batch import split_inputs
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.launch_plan import EngineRequest, start_engine
from autopar.losses import cross_entropy
from autopar.lower import Program, predicted_plan
from autopar.passes import GraphPass, MoE
from autopar.passes.moe.layer import MoEStats
from autopar.plans import Plan
from autopar.programs import Programs
from autopar.runtime.executor import Executor
from autopar.runtime.gather import full_state_dict
from autopar.runtime.grad_clip import GradClipper, check_max_norm
from autopar.runtime.launch import init_from_env, launched_by_torchrun
from autopar.runtime.local import LocalEngine
from autopar.runtime.measure import StepReport
from autopar.runtime.pass_state import PassStates, pass_state_tensors, resolve_passes, split_pass_state

if TYPE_CHECKING:
    from autopar.runtime.engine import Engine

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LossFn = Callable[[Any, Any], torch.Tensor]

log = logging.getLogger("autopar.compile")

DEFAULT_CLUSTER = "local:1"
MOE_PREFIX = "moe."  # the MoE layers' entries in a single-device ``compiled.state_dict()``


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, lr 3e-4, weight decay 0.01: used when ``optimizer=`` is not given."""
    return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)


class Compiled(nn.Module):
    """A model compiled by autopar: call it like the model, train it with :meth:`step`.

    A thin facade: :class:`~autopar.programs.Programs` lowers the model once per input signature
    (shapes, dtypes, train/eval), like ``torch.compile``, running ``passes`` on every capture, and
    an executor (``autopar.runtime.executor.Executor``: the one-device ``LocalEngine`` or the
    distributed ``Engine``) trains. ``passes=None`` takes the passes ``autopar run --random-ltd ...``
    handed over, if any. Under a process group without ``plan=``, the planner (``autopar.plan``, at
    most ``time_limit_s``) chooses what ``fix=`` leaves open.

    With ``passes=[MoE(...)]``, the MoE layers the first capture creates (upcycled from the dense
    MLPs as they are then) are kept in :attr:`moe` (layer index → ``MoELayer``): they are in the
    optimizer, the state dict (``moe.<layer>.…``) and ``train()``/``eval()``, and every later
    capture (eval mode, other shapes) runs these same layers. The replaced dense MLPs stay in
    ``compiled.module``, unchanged and unused.

    ``max_grad_norm`` clips every step's gradients to that total 2-norm, computed over the whole
    model across tensor, pipeline, data and context-parallel ranks (``autopar.runtime.grad_clip``:
    the value ``torch.nn.utils.clip_grad_norm_`` gives on one process); :attr:`last_grad_norm` is
    the latest norm before clipping.

    Batches: :meth:`step` and :meth:`evaluate` take the GLOBAL batch on every rank (the engine
    slices this rank's rows), or with ``local=True`` this rank's OWN rows (``global_batch_size /
    dp``, whole sequences; ``autopar.data.TokenLoader`` reads just these), after
    :meth:`prepare` with a batch of the global shape. Ranks of pipeline stages that take neither
    inputs nor targets may pass ``None``. After distributed training :meth:`full_state_dict` and
    :meth:`gather_module` give the whole model back as plain tensors.
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
        max_grad_norm: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"autopar.compile needs an nn.Module, got {type(model).__name__}")
        if optimizer is not None and not callable(optimizer):
            raise TypeError(f"optimizer must be a factory such as lambda params: torch.optim.AdamW(params, "
                            f"lr=3e-4), got an instance of {type(optimizer).__name__}; pass a callable that "
                            "builds the optimizer from the parameters it is given")
        if plan is not None and not isinstance(plan, Plan):
            raise TypeError(f"plan must be an autopar.Plan, got {type(plan).__name__}")
        self.module = model
        self.cluster = cluster if isinstance(cluster, ClusterSpec) else ClusterSpec.parse(cluster)
        self.fix = Fix.from_dict(fix)
        self.passes = tuple(resolve_passes(passes))
        self.distributed = _check_process_group(self.cluster, self.fix, plan)
        self.loss_fn: LossFn = loss_fn or cross_entropy
        self.moe = nn.ModuleDict()  # str(layer index) → MoELayer, filled by the first capture
        self.num_steps = 0
        self.steps_run = 0  # steps this process ran (num_steps follows checkpoints and set_step)
        self._pass_states = PassStates()
        self._moe_stats: dict[int, MoEStats | None] = {}
        self.max_grad_norm = None if max_grad_norm is None else check_max_norm(max_grad_norm)
        self._clipper: GradClipper | None = None
        self._in_step = False
        self._request = EngineRequest(cluster=self.cluster, fix=self.fix, plan=plan,
                                      time_limit_s=time_limit_s, loss_fn=self.loss_fn,
                                      optimizer=optimizer or default_optimizer)
        self._programs = Programs(model, passes=self.passes, cluster=self.cluster, frontend=frontend,
                                  leaf_modules=leaf_modules, pass_states=self._pass_states, moe=self.moe,
                                  on_new_parameters=self._new_parameters)
        self._executor: Executor | None = None if self.distributed else self._local_engine()

    def _local_engine(self) -> LocalEngine:
        _check_one_device_fix(self.fix)
        return LocalEngine(
            module=self, graph_for=lambda args, kwargs: self.program_for(*args, **kwargs).graph_module,
            parameters=self.named_model_parameters, loss_fn=self.loss_fn, optimizer=self._request.optimizer,
            passes=self._pass_states, plan=self._local_plan,
            moe=lambda: {int(k): m for k, m in self.moe.items()},  # type: ignore[misc]
            recompute=self.fix.recompute or "none", num_microbatches=self.fix.num_microbatches,
            microbatch_size=self.fix.microbatch_size,
        )

    def _new_parameters(self, params: list[nn.Parameter]) -> None:
        if isinstance(self._executor, LocalEngine):
            self._executor.add_parameters(params)

    def program_for(self, *args: Any, **kwargs: Any) -> Program:
        """The lowered Program for this input signature (lowered now if it is new)."""
        return self._programs.get(args, kwargs, training=self.training, step=self.num_steps)

    def captured_for(self, *args: Any, **kwargs: Any) -> Captured:
        """The (transformed) capture for this input signature."""
        return self.program_for(*args, **kwargs).captured

    @property
    def num_lowered(self) -> int:
        """How many times this model was captured (one per input signature, and the planner's)."""
        return self._programs.num_lowered

    def named_model_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter this model trains (what the optimizer holds), each once: the model's
        under its own names (``wte.weight``), then those the passes created under their paths in
        the graph (``blocks.1.mlp.moe.router.weight``, as the multi-device runtime names them)."""
        result = list(self.module.named_parameters())
        first = self._programs.first
        if first is not None:
            known = {id(p) for _, p in result}
            result += [(name, p) for name, p in first.graph_module.named_parameters() if id(p) not in known]
        return result

    def moe_stats(self) -> dict[int, MoEStats | None]:
        """MoE layer index → its expert load in the last training step (``MoEStats``: tokens,
        capacity, assignments routed to and computed by each expert, dropped assignments and
        tokens); ``{}`` without MoE layers. Multi-device: this rank's layers, last microbatch."""
        return dict(self._moe_stats)

    @property
    def passes_applied(self) -> tuple[str, ...]:
        """Names of the passes that ran on the latest capture, in order (empty before it)."""
        first = self._programs.first
        return () if first is None else tuple(a.name for a in self._programs.latest.applied)

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
        return self._programs.latest.captured

    @property
    def executor(self) -> Executor:
        """The runtime that trains this model (a multi-device one is built by the first ``step``
        or by :meth:`prepare`)."""
        if self._executor is None:
            raise RuntimeError("no engine yet: the first .step(inputs, targets) or .prepare(inputs) builds "
                               "it (multi-device runs)")
        return self._executor

    @property
    def engine(self) -> Engine:
        """The distributed runtime engine of a multi-device run (built by the first ``step``)."""
        if not self.distributed:
            raise RuntimeError("no engine: this model runs on one device (compiled.executor is its runtime)")
        return self.executor  # type: ignore[return-value]

    @property
    def started(self) -> bool:
        """Whether the executor has begun (multi-device: built; one device: optimizer made)."""
        return self._executor is not None and (self.distributed or self._executor.started)  # type: ignore[attr-defined]

    @property
    def ready(self) -> bool:
        """Whether the executor and every parameter exist (multi-device: the engine is built; one
        device: the parameters that passes create at the first capture, MoE experts, exist)."""
        if self.distributed:
            return self._executor is not None
        return not any(isinstance(p, MoE) for p in self.passes) or len(self.moe) > 0

    def prepare(self, inputs: Any) -> Executor:
        """Make the runtime for batches like ``inputs`` ready without training: multi-device, plan,
        capture the microbatch and start the Engine (collective: every rank); one device, capture
        (MoE experts then exist). E.g. to build an LR scheduler on :attr:`optimizer`, or to load a
        checkpoint, before the first step. Returns the executor."""
        args, kwargs = split_inputs(inputs)
        if self._executor is None:
            self._executor = start_engine(self._programs, self._request, args, kwargs, step=self.num_steps)
        elif not self.distributed:
            self.program_for(*args, **kwargs)
        return self._executor

    @property
    def plan(self) -> Plan:
        """The Plan being executed (the runtime's, or the single-device plan of the latest capture)."""
        return self.executor.plan

    def _local_plan(self) -> Plan:
        """The one-device Plan of the latest step's batch (or the latest capture's), with the pinned
        recomputation and microbatches the one-device executor runs."""
        program = self._programs.latest
        captured = program.captured
        nodes = list(captured.graph_module.graph.nodes)
        local = self._executor
        assert isinstance(local, LocalEngine), "a multi-device run's plan is its engine's"
        batch = local.last_batch_size or program.batch_size
        count = local.microbatches(batch)
        plan = Plan.single_device(
            captured.model_name, graph_fingerprint=program.fingerprint, cluster=self.cluster,
            global_batch_size=batch, seq_len=program.seq_len, num_layers=len(captured.layers),
        )
        stage = dataclasses.replace(plan.stages[0], first_node=nodes[0].name, last_node=nodes[-1].name,
                                    recompute=local.recompute)
        schedule = dataclasses.replace(plan.schedule, microbatch_size=batch // count, num_microbatches=count)
        return predicted_plan(dataclasses.replace(plan, stages=(stage,), schedule=schedule), program)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.distributed:
            raise ValueError(
                "a model compiled for several devices runs through .step(inputs, targets) and "
                ".evaluate(inputs, targets); for a local forward pass take the whole model with "
                "compiled.gather_module() (every rank calls it) and call that"
            )
        return self.program_for(*args, **kwargs).graph_module(*args, **kwargs)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer the steps use (one object: set its learning rate, or build an LR scheduler on
        it). One device: built from the factory on first use, over the model's parameters and the MoE
        layers' (added as a parameter group if they appear after it was built: make schedulers after
        the first capture, or they miss that group). Several devices: the Engine's, which holds this
        rank's shards; it exists after the first ``step`` or :meth:`prepare`."""
        if self._executor is None:
            raise ValueError("the optimizer of a multi-device model is made with its engine: call "
                             "compiled.prepare(inputs) (or take a first step) before compiled.optimizer")
        return self._executor.optimizer

    def step(self, inputs: Any, targets: Any, *, local: bool = False) -> float:
        """One training step: forward, ``loss_fn(outputs, targets)``, backward, optimizer step.

        ``inputs`` is a tensor, a tuple of positional arguments, or a dict of keyword
        arguments. With MoE layers the loss is ``loss_fn(outputs, targets) + moe_aux_loss``
        (their weighted balance and z losses). Returns the loss of the whole global batch as a
        float, the same on every rank.

        ``local=False`` (default): every rank passes the same GLOBAL batch (the plan's
        ``global_batch_size`` rows) and the engine takes this rank's rows. ``local=True``: every
        rank passes only its OWN rows, ``global_batch_size / dp`` of them (data-parallel rank ``r``
        holds rows ``[r·B/dp, (r+1)·B/dp)`` of the global batch; context-parallel ranks of one dp
        group pass the same rows, whole sequences); call :meth:`prepare` with a global-shaped
        batch before the first such step. A batch whose row count says the other kind is refused
        with a ValueError. Ranks whose pipeline stages need no inputs (or targets) may pass None.
        On one device both are the same.
        """
        return self._train_step(inputs, targets, measured=False, local=local)

    def evaluate(self, inputs: Any, targets: Any, *, local: bool = False) -> float:
        """The loss of a batch computed by the parallel model, forward only: eval mode (passes too:
        random-LTD keeps every token), no gradients, no optimizer step, no change to the step
        counter or any state (``autopar.runtime.evaluate``). Batches as in :meth:`step`; equals one
        process's ``loss_fn(model(inputs), targets)`` (MoE auxiliary losses not added). Collective:
        every rank calls it."""
        args, kwargs = _inputs(inputs)
        mode = self.training
        self.train(False)
        try:
            if self._executor is None:
                self._check_local_prepared(local)
                self.prepare(inputs)
            return self.executor.evaluate(args, kwargs, targets, local=local)
        finally:
            self.train(mode)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trained parameter of the whole model as a plain, full CPU tensor, under the names
        of :meth:`named_model_parameters` (``autopar.runtime.gather``): DTensor shards gathered,
        pipeline stages' parameters broadcast, the same dict on every rank. Collective: every rank
        calls it (after a step or :meth:`prepare`)."""
        executor = self.executor
        if self.distributed and self.plan.parallelism.ep > 1:
            raise ValueError(f"full_state_dict() with expert parallelism (ep = {self.plan.parallelism.ep}) "
                             "is not supported yet: each rank holds other experts under the same names; "
                             "save a checkpoint (autopar.save) and load it with ep = 1")
        return full_state_dict(executor.parameter_copies(), device=executor.device)

    def gather_module(self) -> nn.Module:
        """A copy of the user's model holding the trained weights as plain ``nn.Parameter`` tensors on
        the CPU (tied weights stay tied), to run, save or export like the original. Collective: every
        rank calls it; every rank gets the same module. MoE layers a pass created are not part of the
        original model: use :meth:`full_state_dict` for them."""
        if len(self.moe):
            raise ValueError("gather_module() returns the original model, which has no MoE layers; take "
                             "compiled.full_state_dict() for the MoE layers' weights")
        full = self.full_state_dict()
        named = list(self.module.named_parameters())
        missing = sorted(name for name, _ in named if name not in full)
        if missing:
            raise ValueError(f"gather_module(): parameters {missing[:5]} of the model were not trained by "
                             "this run (the runtime knows them under other names); use "
                             "compiled.full_state_dict()")
        memo: dict[int, Any] = {id(p): nn.Parameter(full[name].clone(), requires_grad=p.requires_grad)
                                for name, p in named}
        module = copy.deepcopy(self.module, memo)
        return module.cpu()

    @property
    def last_grad_norm(self) -> float | None:
        """The total gradient norm of the latest step, before clipping (``max_grad_norm`` runs only)."""
        return None if self._clipper is None else self._clipper.last_norm

    def measure_step(self, inputs: Any, targets: Any) -> StepReport:
        """:meth:`step` under the profiler (it trains the model like a step): this rank's
        measured times and peak memory (``autopar.runtime.measure.StepReport``)."""
        return self._train_step(inputs, targets, measured=True)

    def measure_memory(self, inputs: Any, targets: Any) -> dict[str, int]:
        """:meth:`step` under torch's memory tracker (it trains the model like a step): this rank's
        bytes by category (``autopar.runtime.measure.MEMORY_CATEGORIES``)."""
        return self._train_step(inputs, targets, measured="memory")

    def _train_step(self, inputs: Any, targets: Any, *, measured: bool | str, local: bool = False) -> Any:
        self.train()
        args, kwargs = _inputs(inputs)
        if self._executor is None:
            self._check_local_prepared(local)
        executor = self._executor if self._executor is not None else self.prepare(inputs)
        self._install_clipping(executor)
        run = {False: executor.step, True: executor.measure_step, "memory": executor.measure_memory}[measured]
        self._in_step = True
        try:
            options = {"local": local} if measured is False else {}  # measured steps take global batches
            result = run(args, kwargs, targets, step=self.num_steps, **options)
        finally:
            self._in_step = False
        self._moe_stats = {m.layer: m.stats for m in executor.moe_layers()}
        self.num_steps += 1
        self.steps_run += 1
        return result

    def _check_local_prepared(self, local: bool) -> None:
        if local and self.distributed:
            raise ValueError("step(..., local=True) or evaluate(..., local=True) before the engine exists: "
                             "the planner needs the global batch's shape; call compiled.prepare(inputs) "
                             "with a batch of the global shape first (e.g. torch.zeros(global_batch_size, "
                             "seq_len, dtype=torch.long)), then pass each rank's own rows")

    def _install_clipping(self, executor: Executor) -> None:
        """With ``max_grad_norm``: clip in an optimizer pre-step hook that acts during :meth:`step`
        only (a checkpoint load's zero-learning-rate step must not start collectives)."""
        if self.max_grad_norm is None or self._clipper is not None:
            return
        if self.distributed and self.plan.parallelism.ep > 1:
            raise ValueError(f"max_grad_norm with expert parallelism (ep = {self.plan.parallelism.ep}) is "
                             "not supported yet: drop max_grad_norm or use ep = 1")
        self._clipper = GradClipper(executor.parameter_copies, max_norm=self.max_grad_norm,
                                    device=executor.device)
        executor.optimizer.register_step_pre_hook(self._clip_before_step)

    def _clip_before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._in_step and self._clipper is not None:
            self._clipper.clip()

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Under the runtime: the checkpoint state (parameters and optimizer state under the
        original model's names, DTensor shards kept as such; see ``autopar.save``).
        On one device: ``nn.Module.state_dict`` (the model's under ``module.``, MoE layers under
        ``moe.<layer>.``), plus each pass's state as int64 scalars under
        ``passes.<pass name>.<key>`` (e.g. ``passes.random_ltd.step``)."""
        if self.distributed:
            from autopar.checkpoint import state_dict

            return state_dict(self)
        result = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        pending = self._programs.pending_moe_state
        result.update({f"{prefix}{MOE_PREFIX}{k}": v for k, v in pending.items()})
        result.update(pass_state_tensors(self.pass_state, prefix=prefix))
        return result

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; the ``passes.*`` entries restore the passes' state and
        the step counter (the schedule's step), so training resumes with the same token choices.
        Before the first capture, the ``moe.*`` entries wait for the MoE layers it creates; a state
        without them (a dense model's) makes those layers upcycle the loaded dense MLPs."""
        rest, states = split_pass_state(state_dict)
        if not len(self.moe) and any(isinstance(p, MoE) for p in self.passes):
            moe = [k for k in rest if k.startswith(MOE_PREFIX)]
            self._programs.pending_moe_state = {k[len(MOE_PREFIX):]: rest.pop(k) for k in moe}
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
        """Measure training steps and restore the model: an ``autopar.report.Report`` with, per rank,
        measured and predicted step time and memory by category (``rep.ranks[i].measured.step_s``,
        ``.memory_bytes``), printed as tables, with the MoE layers' expert loads if there are any.
        On one device too; multi-device runs call it on every rank."""
        from autopar.report import report

        return report(self, inputs, targets)


def _inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of a step's inputs; ``None`` (a pipeline rank without the first stage)
    is an empty call."""
    return ((), {}) if inputs is None else split_inputs(inputs)


def _check_one_device_fix(fix: Fix) -> None:
    """Pins a one-device run cannot honour are refused, never ignored (recomputation and
    microbatches are run by the one-device executor; ZeRO over one replica changes nothing)."""
    if fix.schedule not in (None, "gpipe"):
        raise ValueError(f"fix['schedule'] = {fix.schedule!r} needs pp > 1; on one device the microbatches "
                         "run one after another (gpipe): drop the pin or compile for more devices")
    if fix.virtual_stages not in (None, 1):
        raise ValueError(f"fix['virtual_stages'] = {fix.virtual_stages} needs pp > 1; drop the pin on "
                         "one device")
    if fix.sequence_parallel:
        raise ValueError("fix['sequence_parallel'] = True needs tp > 1; drop the pin on one device")


def _check_process_group(cluster: ClusterSpec, fix: Fix, plan: Plan | None) -> bool:
    """Whether the run is distributed; the process group must match the cluster. A process that a
    launcher started (``torchrun``: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set)
    joins its group here when the script did not call ``init_process_group`` itself."""
    if launched_by_torchrun() and not dist.is_initialized():
        init_from_env()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    wanted = plan.world_size if plan is not None else cluster.num_devices
    if wanted != world:
        how = (f"`autopar run script.py --nproc {wanted}`, or `torchrun --nproc-per-node {wanted} script.py`"
               if cluster.local else f"torchrun with {wanted} processes in all")
        raise ValueError(
            f"cluster {cluster.text!r} has {cluster.num_devices} devices (plan: {wanted}) but this "
            f"process group has {world}; launch with {how} (a script that starts its processes itself calls "
            f"torch.distributed.init_process_group first), or compile for cluster='local:{world}'"
        )
    if plan is None and wanted == 1 and fix.world_size() != 1:
        raise ValueError(f"fix={fix.pinned()} asks for dp×tp×pp×cp = {fix.world_size()} devices "
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

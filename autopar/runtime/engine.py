"""The distributed engine: executes one Plan on an initialized process group.

Data flow: ``Captured`` + ``Plan`` → :class:`Engine` (this rank's stages, wrapped
for recomputation and data parallelism, in a pipelining schedule) →
:meth:`Engine.step` runs one global batch and returns the same float loss on every
rank. Mechanism only: the stage split, schedule, microbatches, recomputation and
ZeRO level all come from the Plan.

Loss: with the default loss (token cross-entropy) each microbatch contributes its
*summed* loss divided by the number of counted tokens in the whole global batch,
so the step's loss and gradients equal single-device training exactly, even when
microbatches hold different numbers of counted tokens (masked LM). A user
``loss_fn`` is applied per microbatch and averaged over microbatches and data-
parallel ranks (exact when it is a mean over equally sized microbatches).

Passes with run-time state (``autopar.runtime.pass_state``): the stage modules share the
captured graph's pass modules; each step moves them to the step number and tells them
where this rank's data-parallel shard starts in the global batch, so random-LTD keeps the
tokens that one device would keep. Random-LTD gathers and scatters inside each layer, so
its nodes always fall in the stage of their layer: any stage split works.

Context parallelism (cp > 1): the Captured is the microbatch at ``seq/cp`` tokens
(``autopar.launch_plan``); ``cp_rewrite.rewrite_for_plan`` turns its attentions into ring
attention and its positions global before the stage split; each rank's rows are then cut to
its two sequence chunks (``sequence_shard``). cp ranks are loss replicas like dp ranks: the
loss is scaled by dp·cp and gradients are averaged over the flattened dp × cp mesh.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from autopar.capture import Captured
from autopar.capture.annotate import flat_inputs
from autopar.capture.record import META_KEY
from autopar.losses import IGNORE_INDEX, cross_entropy, logits_of
from autopar.passes.moe.layer import MoELayer
from autopar.plans import Plan
from autopar.runtime.cp_rewrite import rewrite_for_plan
from autopar.runtime.data_parallel import apply_data_parallel, gradient_mesh
from autopar.runtime.evaluate import evaluate_engine
from autopar.runtime.expert_parallel import ExpertGroups, apply_expert_parallel
from autopar.runtime.groups import shared_group
from autopar.runtime.layout import Layout
from autopar.runtime.measure import StepReport, measure_engine_step, measure_memory_bytes
from autopar.runtime.pass_state import PassStates
from autopar.runtime.pipeline import make_schedule, make_stage
from autopar.runtime.rank_batch import BatchLayout, RankBatch, given
from autopar.runtime.recompute import apply_recompute
from autopar.runtime.sequence_shard import SequenceShard
from autopar.runtime.split import check_stage_layers, shared_parameters, split_stages
from autopar.runtime.tensor_parallel import TensorParallelStage, implicit_replication, shard_parameters

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class _GlobalMeanCrossEntropy:
    """Per-microbatch summed cross-entropy over the global batch's counted tokens."""

    def __init__(self, unflatten: Callable[[Any], Any], dp: int) -> None:
        self.unflatten, self.dp, self.count = unflatten, dp, 1

    def __call__(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        logits = logits_of(self.unflatten(output))
        total = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total * (self.dp / self.count)


class Engine:
    """This rank's share of a Plan: stages, schedule, optimizer, tied-weight groups (an
    ``autopar.runtime.executor.Executor``)."""

    distributed = True

    def __init__(self, captured: Captured, plan: Plan, *, loss_fn: Callable[[Any, Any], torch.Tensor],
                 optimizer: OptimizerFactory, device: torch.device | None = None,
                 passes: PassStates | None = None) -> None:
        self.plan, self.captured = plan, captured
        self.passes = passes if passes is not None else PassStates()
        self.device = device or default_device()
        self.layout = Layout.build(plan, self.device.type)
        self.constants = _constant_inputs(captured)
        self.sequence = SequenceShard.of(plan, self.layout.cp_rank)  # captured at seq/cp tokens if cp > 1
        examples = self._tensor_inputs(captured.example_args, captured.example_kwargs)
        self._example_shapes = [self.sequence.global_shape(tuple(v.shape)) if isinstance(v, torch.Tensor)
                                else () for v in examples]
        _check_supported(plan)
        check_stage_layers(len(captured.layers), [s.layers for s in plan.stages])
        _check_moe(captured, plan)
        graphs = split_stages(rewrite_for_plan(captured, plan, self.layout), [s.layers for s in plan.stages],
                              self.constants)
        tied_spec = shared_parameters(graphs)  # by identity, before wrapping replaces parameters
        self.num_stages = len(graphs)
        local = self.layout.local_stages()
        dp_mesh = gradient_mesh(self.layout.mesh)  # dp × cp: cp ranks hold replicas too
        canonical = {id(p): name for name, p in captured.graph_module.named_parameters()}
        self.exact = loss_fn is cross_entropy
        self.experts = _expert_groups(captured, plan, self.layout)
        aux_scale = 1.0 / plan.schedule.num_microbatches if self.exact else 1.0
        regrouped, self.fqns, self.expert_params = [], [], []
        for i in local:
            stage_gm = graphs[i].module.to(self.device)
            experts = [] if self.experts is None else apply_expert_parallel(
                stage_gm, self.experts, aux_loss_scale=aux_scale)
            module, names = _prepare_stage(stage_gm, plan, i, self.layout.mesh["tp"], canonical)
            regrouped.append(module)
            self.fqns.append(names)
            self.expert_params.append(experts)
        self.modules = [apply_data_parallel(m, zero=plan.zero, dp_mesh=dp_mesh, ignored=experts)
                        for m, experts in zip(regrouped, self.expert_params, strict=True)]
        self._aux_losses: list[torch.Tensor] = []
        self._moe = [m for module in self.modules for m in module.modules() if isinstance(m, MoELayer)]
        for layer in self._moe:
            layer.register_forward_hook(self._record_aux_loss)
        self.stage_indices = local
        stages = [make_stage(m, i, self.num_stages, self.device, self.layout.group("pp"),
                             after_shape_inference=self._after_shape_inference)
                  for m, i in zip(self.modules, local, strict=True)]
        unflatten = _output_unflattener(captured.graph_module)
        if self.exact:
            self.loss: Any = _GlobalMeanCrossEntropy(unflatten, plan.parallelism.dp * plan.parallelism.cp)
        else:
            self.loss = lambda output, target: _scalar_loss(loss_fn(unflatten(output), target))
        self.schedule = make_schedule(plan.schedule, stages, self.loss, scale_grads=not self.exact)
        params = [p for m in self.modules for p in m.parameters()]
        if not params:
            raise ValueError(f"the plan gives this rank (stages {local}) no parameters to train, so its "
                             "optimizer would be empty; give every pipeline stage at least one layer with "
                             "parameters (re-plan, or edit the plan's stage layers)")
        self.optimizer = optimizer(params)
        self.tied = _tied_groups(tied_spec, self.layout, self.modules, local)
        self.last_step_s = 0.0
        self._user_loss, self._unflatten, self._loss_checked = loss_fn, unflatten, False
        self.batches = BatchLayout(global_batch_size=plan.global_batch_size, dp=plan.parallelism.dp,
                                   dp_rank=self.layout.dp_rank, example_shapes=self._example_shapes,
                                   cut=self.sequence.shard, device=self.device, has_first=self.has_first,
                                   has_last=self.has_last, dp_group=self.layout.group("dp"))

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This rank's parameters under the original model's names (tied ones once per rank)."""
        seen: dict[str, nn.Parameter] = {}
        for names, module in zip(self.fqns, self.modules, strict=True):
            for name, param in module.named_parameters():
                seen.setdefault(names[name], param)
        return list(seen.items())

    def parameter_copies(self) -> dict[str, list[torch.Tensor]]:
        """Original name → this rank's copies of that parameter (several when a tied weight's
        stages share this rank)."""
        copies: dict[str, list[torch.Tensor]] = {}
        for names, module in zip(self.fqns, self.modules, strict=True):
            for name, param in module.named_parameters():
                copies.setdefault(names[name], []).append(param)
        return copies

    def all_parameter_names(self) -> set[str]:
        """Every parameter of the whole model (all ranks' together)."""
        return {fqn for fqn, _ in self.captured.graph_module.named_parameters()}

    def measure_step(self, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, *,
                     step: int = 0) -> StepReport:
        """:meth:`step` under the profiler (it trains), each local stage's compute labelled."""
        return measure_engine_step(self, args, kwargs, targets, step=step)

    def measure_memory(self, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, *,
                       step: int = 0) -> dict[str, int]:
        """:meth:`step` under the memory tracker (it trains): this rank's bytes by category."""
        return measure_memory_bytes(lambda: self.step(args, kwargs, targets, step=step), modules=self.modules,
                                    optimizer=self.optimizer, device=self.device,
                                    input_gradients_apart=self.plan.schedule.name == "zero_bubble")

    def moe_layers(self) -> list[MoELayer]:
        """This rank's MoE layers as its stages run them (their ``stats`` are this rank's last
        microbatch; with ep > 1 each holds this rank's experts only)."""
        return list(self._moe)

    def _after_shape_inference(self) -> None:
        """torch's first-step shape inference ran the stages once: that forward does not count."""
        self.passes.restart_step()
        self._aux_losses.clear()

    def _record_aux_loss(self, layer: nn.Module, args: Any, output: Any) -> None:
        if layer.training and layer.last_aux_loss is not None:
            self._aux_losses.append(layer.last_aux_loss.detach().reshape(1))

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_indices

    @property
    def has_last(self) -> bool:
        return self.num_stages - 1 in self.stage_indices

    def step(self, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, *, step: int = 0,
             local: bool = False) -> float:
        """One global batch: forward/backward through the schedule, optimizer step.
        ``step`` is the training step's number (passes with schedules read it); ``local``: the
        arguments are this rank's rows, not the global batch (``autopar.runtime.rank_batch``)."""
        start = time.perf_counter()
        batch = self.plan.global_batch_size
        data = self.rank_batch(args, kwargs, targets, local=local)
        self.passes.begin_step(step, first_sample=data.first_sample)
        if self.exact:
            self.loss.count = data.counted
        elif not self._loss_checked:
            self._check_user_loss(data.target)
        losses: list[torch.Tensor] = []
        self._aux_losses.clear()
        self.optimizer.zero_grad(set_to_none=True)
        # return_outputs=False: the loss is all a step returns, so the last stage need not keep every
        # microbatch's output (fp32 logits, b·s·V·4 bytes each) to concatenate them at the end;
        # an output lives only until its microbatch's backward (MEASURED pp 4 1F1B, shape B, last
        # stage: 259 MiB of activations at the step's end with them kept)
        with implicit_replication():  # backward too: tensors made inside a TP graph join replicated
            self.schedule.step(*data.inputs, target=data.target, losses=losses if self.has_last else None,
                               return_outputs=False)
        self._sync_tied_gradients()
        if self.experts is not None:
            self.experts.reduce_gradients([p for params in self.expert_params for p in params])
        self.optimizer.step()
        self.passes.end_step(self.captured.graph_module, batch)
        loss = self._global_loss(losses)
        self.last_step_s = time.perf_counter() - start
        return loss

    def rank_batch(self, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, *,
                   local: bool) -> RankBatch:
        """This rank's inputs and targets of a global batch (or of its own rows, ``local``), checked."""
        tensors = self._tensor_inputs(args, kwargs) if given(args, kwargs) else None
        return self.batches.split(tensors, targets, local=local, count_tokens=self.exact)

    def evaluate(self, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, *,
                 local: bool = False) -> float:
        """Loss of a batch, forward only (``autopar.runtime.evaluate``); changes no state."""
        return evaluate_engine(self, self.rank_batch(args, kwargs, targets, local=local))

    def _check_user_loss(self, targets: Any) -> None:
        """Before the first step (a pipeline would wait forever for a last stage that failed), the
        last stage calls ``loss_fn`` on zeros shaped like one microbatch's output and every rank
        learns whether it returned a scalar (one all-reduce, once)."""
        problem = ""
        if self.has_last:
            output = list(self.captured.graph_module.graph.nodes)[-1]
            record = output.meta.get(META_KEY)
            leaves, spec = tree_flatten(output.args[0])
            if record is not None and len(record.shapes) == len(leaves) > 0:
                zeros = [torch.zeros(shape, dtype=getattr(torch, dtype), device=self.device)
                         for shape, dtype in zip(record.shapes, record.dtypes, strict=True)]
                target = tree_map(lambda t: t.chunk(self.plan.schedule.num_microbatches)[0]
                                  if isinstance(t, torch.Tensor) and t.dim() else t, targets)
                with torch.no_grad():
                    value = self._unflatten(tree_unflatten(zeros, spec))
                    loss = self._user_loss(value, _to(target, self.device))
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    problem = f"loss_fn must return a scalar tensor, got {loss!r:.80}"
        failed = torch.tensor([float(bool(problem))], device=self.device)
        dist.all_reduce(failed)
        if problem or float(failed):
            raise TypeError(problem or "loss_fn must return a scalar tensor: the last pipeline stage's "
                            "loss_fn did not (see that rank's error)")
        self._loss_checked = True

    def _tensor_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """The graph's inputs without the constants baked into the stages (checked equal)."""
        gm = self.captured.graph_module
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        values = flat_inputs(gm, args, kwargs)
        for name, value in zip(names, values, strict=True):
            if name in self.constants and value != self.constants[name]:
                raise ValueError(f"input {name} was {self.constants[name]!r} when the model was "
                                 f"compiled and is {value!r} now; non-tensor inputs cannot change")
        return [v for name, v in zip(names, values, strict=True) if name not in self.constants]

    def _sync_tied_gradients(self) -> None:
        for group, params in self.tied:
            for param in params:
                if param.grad is None:  # a copy this stage holds but does not use: it adds nothing, but
                    param.grad = torch.zeros_like(param)  # every rank of the group must join the reduce
                grad = param.grad  # sharded/replicated grads: reduce the local part
                dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=group)

    def _global_loss(self, losses: list[torch.Tensor]) -> float:
        if losses:
            local = torch.stack([loss.detach().float() for loss in losses])
            value = local.sum() if self.exact else local.mean()
        else:
            value = torch.zeros(())
        value = value.reshape(1).to(self.device) + self._aux_loss_sum()
        dist.all_reduce(value)
        par = self.plan.parallelism
        return float(value) / (par.dp * par.cp * par.tp)


    def _aux_loss_sum(self) -> torch.Tensor:
        """Σ over this rank's MoE layers of the mean auxiliary loss over its microbatches
        (recomputation replays a forward with the same value, so the mean is unchanged)."""
        if not self._aux_losses:
            return torch.zeros(1, device=self.device)
        calls = len(self._aux_losses) // len(self._moe)  # forwards per layer this step
        return torch.cat(self._aux_losses).sum().reshape(1).to(self.device) / max(calls, 1)


def _expert_groups(captured: Captured, plan: Plan, layout: Layout) -> ExpertGroups | None:
    """Expert-parallel groups when the graph has MoE layers (collective: all ranks build them)."""
    if not any(isinstance(m, MoELayer) for m in captured.graph_module.modules()):
        return None
    groups = ExpertGroups.build(layout.mesh.mesh, layout.rank, plan.parallelism.ep)
    return dataclasses.replace(groups, dp=plan.parallelism.dp * plan.parallelism.cp)  # loss replicas


def _prepare_stage(gm: torch.fx.GraphModule, plan: Plan, index: int, tp_mesh: Any,
                   canonical: dict[int, str]) -> tuple[nn.Module, dict[str, str]]:
    """Tensor parallelism, then recomputation, for one stage; and its parameter names
    (module name → original model name), tracked by identity through both."""
    before = {name: canonical[id(p)] for name, p in gm.named_parameters(remove_duplicate=False)}
    shard_parameters(gm, plan.shardings, tp_mesh, sequence_parallel=plan.sequence_parallel)
    by_id = {id(p): before[name] for name, p in gm.named_parameters(remove_duplicate=False)}
    par = plan.parallelism
    module = apply_recompute(gm, plan.stages[index].recompute, regroup=plan.zero >= 1 and par.dp * par.cp > 1)
    if tp_mesh.size() > 1:
        module = TensorParallelStage(module, tp_mesh)
    return module, {name: by_id[id(p)] for name, p in module.named_parameters(remove_duplicate=False)}


def _constant_inputs(captured: Captured) -> dict[str, Any]:
    """Placeholders whose example value is not a tensor (None defaults, flags)."""
    gm = captured.graph_module
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    values = flat_inputs(gm, captured.example_args, captured.example_kwargs)
    return {name: v for name, v in zip(names, values, strict=True) if not isinstance(v, torch.Tensor)}


def _check_supported(plan: Plan) -> None:
    """Plan features this runtime cannot execute yet fail here, by name, before any work."""
    if plan.parallelism.pp > 1 and any(s.strategy == "vocab" for s in plan.shardings):
        raise ValueError("vocabulary-parallel embeddings ('vocab' shardings) with pipeline stages (pp > 1) "
                         "are not supported by this runtime yet: the embedding and a tied LM head sit on "
                         "different ranks; drop the 'vocab' sharding or use pp = 1")
    par = plan.parallelism
    if plan.schedule.name == "zero_bubble" and plan.zero >= 3 and par.dp * par.cp > 1:
        raise ValueError(
            f"schedule 'zero_bubble' with ZeRO-3 over dp × cp = {par.dp * par.cp} ranks is not supported by "
            "this runtime yet: FSDP2 reshards and reduces a stage's weights around its input-gradient "
            "backward, before the deferred weight-gradient step, and training diverges from one process "
            "(MEASURED: pp2 × dp2, the second step's loss 4.643 against 4.674); pin zero = 0 or 1, or "
            "schedule '1f1b'")


def _scalar_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a scalar tensor, got {loss!r:.80}")
    return loss


def _check_moe(captured: Captured, plan: Plan) -> None:
    if plan.parallelism.ep > 1 and not any(isinstance(m, MoELayer) for m in captured.graph_module.modules()):
        raise ValueError(f"the plan has expert parallelism (ep = {plan.parallelism.ep}) but the model has no "
                         "MoE layers: add passes=[autopar.passes.MoE(...)] or use ep = 1")


def default_device() -> torch.device:
    """This rank's GPU under NCCL (``LOCAL_RANK``), else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _output_unflattener(gm: torch.fx.GraphModule) -> Callable[[Any], Any]:
    info = getattr(gm.graph._codegen, "pytree_info", None)
    spec = getattr(info, "out_spec", None)
    if spec is None:
        return lambda output: output
    return lambda output: tree_unflatten(tree_flatten(output)[0], spec)


def _tied_groups(tied_spec: list[tuple[tuple[int, str], ...]], layout: Layout, modules: list[nn.Module],
                 local: list[int]) -> list[tuple[dist.ProcessGroup, list[torch.Tensor]]]:
    """Process groups over the pp ranks that hold one tied parameter (collective: all ranks)."""
    result = []
    world_coords = layout.mesh.mesh  # (pp, dp, cp, tp) grid of ranks
    for group in tied_spec:
        stage_ranks = sorted({layout.stage_ranks[stage] for stage, _ in group})
        if len(stage_ranks) < 2:
            continue
        mine = None
        for column in world_coords.flatten(1).unbind(1):  # every (dp, cp, tp) position
            ranks = [int(column[p]) for p in stage_ranks]
            pg = shared_group(ranks)
            if layout.rank in ranks:
                mine = pg
        if mine is None:
            continue
        names = [name for _, name in group]
        params = [_find_param(modules[local.index(stage)], [name, *names]) for stage, name in group
                  if stage in local]
        result.append((mine, params))
    return result


def _find_param(module: nn.Module, names: list[str]) -> torch.Tensor:
    """The parameter of ``module`` called ``names[0]``, else any other name of the same tied weight
    (a stage module whose graph uses the weight under two names, e.g. a tied GPT-2's
    ``transformer.wte.weight`` and ``lm_head.weight``, keeps one of them once the data-parallel
    wrapper replaces its parameters)."""
    found = dict(module.named_parameters(remove_duplicate=False))
    for name in names:
        for candidate, param in found.items():
            if candidate.split("module.")[-1] == name or candidate.endswith(name):
                return param
    raise KeyError(f"tied parameter {names[0]!r} (also called {names[1:]}) is not among {sorted(found)}")

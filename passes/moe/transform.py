"""Mixture-of-Experts as a graph pass: sparse upcycling of a captured dense model, or adoption of
its own sparse-MoE blocks (issue 7).

Data flow: ``autopar.capture`` → annotated graph → :func:`moe_pass` (behind the :class:`MoE`
config, ``passes/moe/config.py``) → a graph in which the feed-forward block of each chosen repeated
layer is one ``call_module`` of a :class:`~autopar.passes.moe.layer.MoELayer`; its node carries a
:class:`MoENodeRecord` in ``node.meta["autopar_moe"]`` (E, k, gate, capacity factors, tokens,
capacity) and a ``NodeRecord`` with the active FLOPs; ``gm.meta["autopar_moe"]`` lists the layers.
With ``gate="dts"`` the pass installs the step counter :class:`~autopar.passes.moe.gates.MoERuntime`
at ``gm.moe`` (a ``PassRuntime``). :func:`moe_aux_loss` returns the weighted balance + z losses of
the last forward, to add to the training loss; :func:`moe_stats` the per-layer expert loads.

Upcycling: :mod:`autopar.passes.moe.ffn` finds layer ℓ's feed-forward block (its ``mlp``-like
submodule's region, in fx or exported ATen graphs, else the block found by its graph shape: linear
h → f, per-token ops, linear f → h, added back to the residual stream) and copies it into
an expert module (n, h) → (n, h). With ``upcycle`` (default) every expert is a copy, so with
weights renormalized over the top-k and no token dropped the transformed model computes the dense
function (up to fp32 rounding); otherwise the experts' weights are re-drawn. Its node's FLOPs are
``k ×`` the block's plus the router's (plus the dense branch and mixer with ``residual``).

Adoption (``layers="existing"``): :mod:`autopar.passes.moe.hf` reads each HF sparse-MoE block
(router, fused experts, top-k, activation) and the pass installs a dropless MoE layer with the
same weights; the node keeps the block's captured FLOPs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn

from autopar.capture.record import META_KEY, NodeRecord
from autopar.passes.moe.config import MoEConfig
from autopar.passes.moe.ffn import Block, expert_module, find_block, region_block, region_path
from autopar.passes.moe.gates import RUNTIME, DTSGate, MoERuntime
from autopar.passes.moe.hf import SparseBlock, find_sparse_block, gated_experts, is_sparse_block
from autopar.passes.moe.layer import MoELayer, MoEStats, expert_capacity
from autopar.passes.runner import PassContext

__all__ = ["MoE", "MoENodeRecord", "MoERecord", "moe_aux_loss", "moe_layers", "moe_pass", "moe_runtime",
           "moe_stats"]

@dataclass(frozen=True, kw_only=True)
class MoE(MoEConfig):
    __doc__ = MoEConfig.__doc__

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        return moe_pass(gm, ctx, config=self)


@dataclass(frozen=True, kw_only=True)
class MoENodeRecord:
    """What the planner and cost model need about one MoE node (``node.meta["autopar_moe"]``)."""

    layer: int
    module_path: str
    num_experts: int
    top_k: int  # sparse top-k (DTS: after its dense phase)
    capacity_factor: float
    eval_capacity_factor: float
    tokens: int  # tokens per forward at capture
    capacity: int  # per expert at capture, training factor (tokens when dropless)
    expected_tokens_per_expert: float  # tokens · top_k / E
    expert_param_bytes: int  # one expert
    gate: str = "topk"  # "topk" or "dts" (dense over all E experts for its first dts_anneal_steps)
    residual: bool = False  # Residual-MoE: a dense MLP runs beside the experts on every token
    dropless: bool = False
    adopted: bool = False  # the model's own sparse-MoE block (layers="existing")


RECORD_KEY = "autopar_moe"
"""The node meta key of :class:`MoENodeRecord` (beside the one ``NodeRecord`` of ``META_KEY``)."""


@dataclass(frozen=True, kw_only=True)
class MoERecord:
    """``gm.meta["autopar_moe"]``: the layers the pass replaced, by index."""

    layers: tuple[int, ...]
    num_layers: int
    nodes: tuple[MoENodeRecord, ...]


@dataclass(frozen=True)
class _Planned:
    """One MoE layer built and annotated, before the graph changes."""

    block: Block
    moe: MoELayer
    target: str
    record: NodeRecord
    moe_record: MoENodeRecord


def _record(node: fx.Node) -> NodeRecord:
    return node.meta[META_KEY]


def moe_layers(gm: fx.GraphModule) -> dict[int, MoELayer]:
    """Layer index → the MoE layer the pass installed."""
    return {m.layer: m for m in gm.modules() if isinstance(m, MoELayer)}  # type: ignore[misc]


def moe_runtime(gm: fx.GraphModule) -> MoERuntime | None:
    """The step counter the pass installed at ``gm.moe`` (``gate="dts"``), or None."""
    runtime = getattr(gm, RUNTIME, None)
    return runtime if isinstance(runtime, MoERuntime) else None


def moe_aux_loss(gm: fx.GraphModule) -> torch.Tensor:
    """Sum over MoE layers of ``aux_loss_weight · balance + z_loss_weight · z`` of the last forward."""
    losses = [m.last_aux_loss for m in moe_layers(gm).values() if m.last_aux_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())


def moe_stats(gm: fx.GraphModule) -> dict[int, MoEStats | None]:
    """Layer index → expert load of the last forward (None before the first)."""
    return {layer: m.stats for layer, m in moe_layers(gm).items()}


def moe_pass(gm: fx.GraphModule, ctx: PassContext, *, config: MoE) -> fx.GraphModule:
    """Replace the feed-forward block of the chosen layers by MoE layers (see the module docstring)."""
    _check_graph(gm)
    num_layers = _num_layers(gm, ctx)
    if config.adopts:
        sparse = _existing_blocks(gm, num_layers)
        blocks = {layer: s.block for layer, s in sparse.items()}
    else:
        sparse, blocks = {}, {layer: find_block(gm, layer) for layer in _chosen_layers(config, num_layers)}
        _refuse_sparse(gm, blocks)
    layers = tuple(sorted(blocks))
    counts = config.experts_for(layers)
    runtime = MoERuntime(step=ctx.step) if config.gate == "dts" else None
    planned = [_plan(gm, config, blocks[layer], counts[layer], sparse.get(layer), runtime)
               for layer in layers]
    if runtime is not None:
        gm.add_submodule(RUNTIME, runtime)
    for item in planned:  # all built and checked before the graph changes
        _install(gm, item)
    gm.meta[RECORD_KEY] = MoERecord(layers=layers, num_layers=num_layers,
                                    nodes=tuple(p.moe_record for p in planned))
    gm.graph.lint()
    gm.recompile()
    return gm


def _check_graph(gm: fx.GraphModule) -> None:
    if moe_layers(gm):
        raise ValueError("the MoE pass was already applied to this graph; pass MoE(...) once")
    if hasattr(gm, RUNTIME):
        raise ValueError(f"the graph already has an attribute {RUNTIME!r}, where the MoE pass keeps its "
                         "step counter; rename the model's top-level attribute")
    missing = [n.name for n in gm.graph.nodes if META_KEY not in n.meta]
    if missing:
        raise ValueError(f"nodes {missing[:3]} have no autopar annotation; run the MoE pass on a graph from "
                         "autopar.capture (or autopar.transform), before passes that add unannotated nodes")


def _num_layers(gm: fx.GraphModule, ctx: PassContext) -> int:
    captured = ctx.captured
    if captured is not None and getattr(captured, "layers", None):
        return len(captured.layers)
    indices = {_record(n).layer for n in gm.graph.nodes} - {None}
    return max(indices) + 1 if indices else 0  # type: ignore[type-var]


def _chosen_layers(config: MoE, num_layers: int) -> tuple[int, ...]:
    if num_layers == 0:
        raise ValueError("the graph has no repeated layers (capture found no nn.ModuleList of blocks); "
                         "the MoE pass replaces the feed-forward blocks of repeated layers")
    if config.layers == "every_other":
        if num_layers < 2:
            raise ValueError(f"the model has {num_layers} repeated layer; MoE.layers='every_other' uses "
                             "layers 1, 3, …: pass layers=(0,) to make its one layer an MoE layer")
        return tuple(range(1, num_layers, 2))
    if config.layers == "second_half":
        return tuple(range(num_layers // 2, num_layers))
    bad = [i for i in config.layers if i >= num_layers]
    if bad:
        raise ValueError(f"MoE.layers = {config.layers} names layer(s) {bad}, but the model has {num_layers} "
                         f"repeated layers: expected indices in [0, {num_layers})")
    return tuple(config.layers)


def _existing_blocks(gm: fx.GraphModule, num_layers: int) -> dict[int, SparseBlock]:
    """Layer → its native sparse-MoE block, for every layer that has one."""
    found, skipped = {}, []
    for layer in range(num_layers):
        path = region_path(gm, layer)
        try:
            block = region_block(gm, layer, path) if path is not None else None
        except ValueError as err:  # not one block: not an adoptable sparse-MoE block either
            skipped.append(str(err))
            continue
        if block is not None and is_sparse_block(gm, block):
            found[layer] = find_sparse_block(gm, block)
    if not found:
        why = f" (skipped: {'; '.join(skipped)})" if skipped else ""
        raise ValueError("MoE.layers = 'existing' found no sparse-MoE block (a feed-forward module with "
                         "stacked expert weights, as HF Mixtral's) in the model's layers; choose layers to "
                         f"upcycle, e.g. layers='every_other'{why}")
    return found


def _refuse_sparse(gm: fx.GraphModule, blocks: dict[int, Block]) -> None:
    sparse = [f"{layer} ({b.path})" for layer, b in blocks.items() if is_sparse_block(gm, b)]
    if sparse:
        raise ValueError(f"layers {sparse} already hold sparse-MoE blocks; pass MoE(layers='existing') to "
                         "adopt them, or choose other layers to upcycle")


def _plan(gm: fx.GraphModule, config: MoE, block: Block, num_experts: int | None, sparse: SparseBlock | None,
          runtime: MoERuntime | None) -> _Planned:
    if sparse is not None:
        experts, top_k, dense = _adopted(config, sparse, num_experts)
    else:
        experts, top_k, dense = _upcycled(gm, config, block, num_experts)  # type: ignore[arg-type]
    layer, h = block.layer, block.hidden_size
    gate = None if runtime is None else DTSGate(
        start_temperature=config.dts_start_temperature, end_temperature=config.dts_end_temperature,
        anneal_steps=config.dts_anneal_steps, threshold=config.dts_threshold, seed=config.seed,
        runtime=runtime)
    moe = MoELayer(experts, h, top_k=top_k, capacity_factor=config.capacity_factor,
                   eval_capacity_factor=config.eval_capacity_factor, aux_loss_weight=config.aux_loss_weight,
                   z_loss_weight=config.z_loss_weight, seed=config.seed + layer, layer=layer, gate=gate,
                   dropless=config.is_dropless(), dense=dense)
    device = next(experts[0].parameters()).device
    for module in (moe.router, moe.coefficient):
        if module is not None:
            module.to(device=device)
    if sparse is not None:
        with torch.no_grad():
            moe.router.weight.copy_(sparse.router.float())
    moe.train(gm.training)
    target = f"{block.path}.moe" if block.path else f"moe_{layer}"
    record = _node_record(block, moe, target, adopted=sparse is not None)
    return _Planned(block=block, moe=moe, target=target, record=record,
                    moe_record=_moe_record(config, block, moe, target, adopted=sparse is not None))


def _adopted(config: MoE, sparse: SparseBlock, num_experts: int | None) -> tuple[list[nn.Module], int, None]:
    where = f"layer {sparse.block.layer} ({sparse.block.path})"
    if num_experts is not None and num_experts != sparse.num_experts:
        raise ValueError(f"MoE.num_experts = {config.num_experts!r}, but the model's sparse-MoE block at "
                         f"{where} has {sparse.num_experts} experts: pass num_experts=None to take the "
                         "model's")
    if config.top_k is not None and config.top_k != sparse.top_k:
        raise ValueError(f"MoE.top_k = {config.top_k}, but the model's sparse-MoE block at {where} routes "
                         f"each token to {sparse.top_k} experts: pass top_k=None to take the model's")
    return list(gated_experts(sparse)), sparse.top_k, None


def _upcycled(gm: fx.GraphModule, config: MoE, block: Block, num_experts: int
              ) -> tuple[list[nn.Module], int, nn.Module | None]:
    top_k = config.top_k
    assert top_k is not None  # filled in by MoE.__post_init__ when upcycling
    if top_k > num_experts:
        raise ValueError(f"MoE.top_k = {top_k} exceeds the {num_experts} experts of layer {block.layer}: "
                         f"expected top_k <= num_experts")
    dense = expert_module(gm, block)
    experts: list[nn.Module] = [copy.deepcopy(dense) for _ in range(num_experts)]
    if not config.upcycle:
        generator = torch.Generator().manual_seed(config.seed + 7919 * (block.layer + 1))
        for expert in experts:
            _fresh(expert, generator)
    return experts, top_k, (dense if config.residual else None)


def _fresh(expert: nn.Module, generator: torch.Generator) -> None:
    """From-scratch experts: weight matrices ~ N(0, 0.02²), biases 0, other vectors kept."""
    with torch.no_grad():
        for name, param in expert.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.empty(param.shape).normal_(0.0, 0.02, generator=generator))
            elif name.rsplit(".", 1)[-1] == "bias":
                param.zero_()


def _param_bytes(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() * p.element_size() for p in module.parameters())


def _node_record(block: Block, moe: MoELayer, target: str, *, adopted: bool) -> NodeRecord:
    """Adopted: the block's captured costs. Upcycled: ``k ×`` the block's, plus router (and with
    Residual-MoE the dense branch once and its mixer)."""
    records, out = block.records(), _record(block.output)
    flops_fwd, flops_bwd = sum(r.flops_fwd for r in records), sum(r.flops_bwd for r in records)
    read, written = sum(r.bytes_read for r in records), sum(r.bytes_written for r in records)
    if not adopted:
        tokens, h, e = block.tokens, block.hidden_size, moe.num_experts
        mixers = e + (2 if moe.dense is not None else 0)  # router outputs, plus the 2 coefficients
        extra_flops = 2 * tokens * h * mixers
        extra_bytes = _param_bytes(moe.router) + _param_bytes(moe.coefficient)
        copies = moe.top_k + (1 if moe.dense is not None else 0)
        flops_fwd, flops_bwd = copies * flops_fwd + extra_flops, copies * flops_bwd + 2 * extra_flops
        read, written = copies * read + extra_bytes, copies * written + 4 * tokens * mixers
    return NodeRecord(shapes=out.shapes, dtypes=out.dtypes, flops_fwd=flops_fwd, flops_bwd=flops_bwd,
                      bytes_read=read, bytes_written=written, param_bytes=_param_bytes(moe),
                      module_path=target, layer=block.layer)


def _moe_record(config: MoE, block: Block, moe: MoELayer, target: str, *, adopted: bool) -> MoENodeRecord:
    tokens, e, k = block.tokens, moe.num_experts, moe.top_k
    return MoENodeRecord(
        layer=block.layer, module_path=target, num_experts=e, top_k=k, capacity_factor=config.capacity_factor,
        eval_capacity_factor=config.eval_capacity_factor, tokens=tokens,
        capacity=tokens if moe.dropless else expert_capacity(tokens, e, k, config.capacity_factor),
        expected_tokens_per_expert=tokens * k / e, expert_param_bytes=_param_bytes(moe.experts[0]),
        gate=config.gate, residual=moe.dense is not None, dropless=moe.dropless, adopted=adopted)


def _install(gm: fx.GraphModule, planned: _Planned) -> None:
    """Put ``planned.moe`` in the graph in place of its block, and drop the block's nodes and weights."""
    block, graph = planned.block, gm.graph
    gm.add_submodule(planned.target, planned.moe)
    with graph.inserting_after(block.output):
        node = graph.call_module(planned.target, (block.input,))
    upstream = ("val", "tensor_meta", "stack_trace")  # torch's own keys, so views can point at source
    node.meta.update({k: block.output.meta[k] for k in upstream if k in block.output.meta})
    node.meta[META_KEY] = planned.record
    node.meta[RECORD_KEY] = planned.moe_record
    block.output.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    for old in reversed((*block.params, *block.nodes)):
        graph.erase_node(old)
    used = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    for old in (*block.params, *block.nodes):
        if old.op in ("call_module", "get_attr") and old.target not in used:
            _delete(gm, str(old.target))


def _delete(gm: fx.GraphModule, target: str) -> None:
    """Remove a submodule or parameter from ``gm``, then the containers it leaves empty."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    delattr(owner, name)
    while owner_path and not (owner._parameters or owner._buffers or owner._modules):
        owner_path, _, name = owner_path.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        delattr(owner, name)

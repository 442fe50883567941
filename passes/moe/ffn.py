"""Where a layer's feed-forward block is in a captured graph, and the block as its own module.

Data flow: :func:`~autopar.passes.moe.moe_pass` → :func:`find_block` per chosen layer → a
:class:`Block` (nodes, parameters, the one value entering and the one leaving) →
:func:`expert_module` copies it into an ``fx.GraphModule`` mapping (n, h) → (n, h), the expert
that the pass copies E times (upcycling); :mod:`autopar.passes.moe.hf` reads native sparse-MoE
blocks found the same way.

Two ways to find the block of layer ℓ, tried in order:

1. **Region**: the nodes whose ``module_path`` lies under the layer's feed-forward submodule
   (a path component named ``mlp``, ``feed_forward``, ``ffn``, ``block_sparse_moe`` or T5's
   ``DenseReluDense``), with exactly one tensor entering from outside and exactly one value used
   outside; parameters (``get_attr``) must be read only inside. Covers fx graphs (zoo GPT
   ``blocks.ℓ.mlp``) and ATen graphs from ``torch.export`` (HF GPT-2's Conv1D ``addmm``, Llama's
   gated SwiGLU MLP, T5).
2. **Linear chain** (fx graphs): two ``nn.Linear`` leaf calls of the layer, ``fc: h → f`` and
   ``proj: f → h``, joined by one-input ops (activation, dropout) that nothing else reads (zoo BERT).

Exported graphs bake the token count into reshapes (``view(x, [b, s, f])``). The expert takes
(n, h), views it as ``(1, …, 1, n, h)`` (the captured input's rank) and rewrites a size argument
that starts with the captured leading dims ``(b, s)`` to ``(1, n)``, or with their product ``b·s``
to ``n``; it is then run on fake tensors with a token count seen nowhere in the capture.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from autopar.capture.record import META_KEY, NodeRecord

FFN_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "DenseReluDense")
_SIZE_ARG = {  # ATen ops whose shape argument may hold the literal token count: its position
    "aten.view.default": 1, "aten.reshape.default": 1, "aten._unsafe_view.default": 1,
    "aten.expand.default": 1, "aten.new_zeros.default": 1, "aten.new_ones.default": 1,
    "aten.new_empty.default": 1, "aten.new_full.default": 1, "aten.zeros.default": 0,
    "aten.ones.default": 0, "aten.empty.memory_format": 0, "aten.full.default": 0,
}
_SIZE_METHODS = ("view", "reshape", "expand", "new_zeros", "new_ones", "new_empty")


@dataclass(frozen=True)
class Block:
    """One layer's feed-forward block: ``nodes`` (graph order) map ``input`` to ``output``."""

    layer: int
    path: str  # module path it lives under; the MoE layer goes to ``<path>.moe``
    nodes: tuple[fx.Node, ...]  # compute nodes
    params: tuple[fx.Node, ...]  # get_attr nodes read only by ``nodes``
    input: fx.Node
    output: fx.Node

    @property
    def hidden_size(self) -> int:
        return _record(self.input).shapes[0][-1]

    @property
    def leading_dims(self) -> tuple[int, ...]:
        """The captured input's dims before h, e.g. ``(b, s)``."""
        return tuple(_record(self.input).shapes[0][:-1])

    @property
    def tokens(self) -> int:
        return math.prod(self.leading_dims)

    def records(self) -> list[NodeRecord]:
        return [_record(n) for n in (*self.params, *self.nodes)]


def _record(node: fx.Node) -> NodeRecord:
    return node.meta[META_KEY]


def find_block(gm: fx.GraphModule, layer: int) -> Block:
    """Layer ``layer``'s feed-forward block: its region, else its Linear chain (module docstring)."""
    region_error = None
    path = region_path(gm, layer)
    if path is not None:
        try:
            return region_block(gm, layer, path)
        except ValueError as err:
            region_error = str(err)
    try:
        return _linear_chain(gm, layer)
    except ValueError as err:
        if region_error is None:
            raise
        raise ValueError(f"{region_error}; nor is it a Linear chain: {err}") from None


def region_path(gm: fx.GraphModule, layer: int) -> str | None:
    """The module path of layer ``layer``'s feed-forward submodule, or None."""
    paths = set()
    for node in gm.graph.nodes:
        record = node.meta.get(META_KEY)
        if record is None or record.layer != layer or not record.module_path:
            continue
        parts = record.module_path.split(".")
        index = next((i for i, part in enumerate(parts) if part in FFN_NAMES), None)
        if index is not None:
            paths.add(".".join(parts[:index + 1]))
    if len(paths) > 1:
        raise ValueError(f"layer {layer} has several feed-forward modules {sorted(paths)}; the MoE pass "
                         "replaces one per layer: leave this layer out of MoE.layers")
    return paths.pop() if paths else None


def _inside(node: fx.Node, path: str) -> bool:
    module_path = _record(node).module_path
    return module_path == path or module_path.startswith(path + ".")


def region_block(gm: fx.GraphModule, layer: int, path: str) -> Block:
    """The nodes under ``path`` as a :class:`Block`; ValueError when it is not one block h → h."""
    where = f"layer {layer}'s feed-forward module {path}"
    members = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and _inside(n, path)]
    inside = set(members)
    params = tuple(n for n in members if n.op == "get_attr")
    nodes = tuple(n for n in members if n.op != "get_attr")
    shared = [p.target for p in params if any(u not in inside for u in p.users)]
    entering = {a for n in nodes for a in n.all_input_nodes if a not in inside}
    outside_params = [a.target for a in entering if a.op == "get_attr"]
    leaving = [n for n in nodes if any(u not in inside for u in n.users)]
    if shared or outside_params:
        names = sorted(map(str, shared + outside_params))
        raise ValueError(f"{where} shares parameters {names} with the rest of the model; experts need their "
                         "own copies")
    if len(entering) != 1 or len(leaving) != 1:
        raise ValueError(f"{where} takes {len(entering)} values from outside "
                         f"({sorted(n.name for n in entering)}) and {len(leaving)} are used outside "
                         f"({[n.name for n in leaving]}); an expert maps one tensor (n, h) to one (n, h)")
    block = Block(layer=layer, path=path, nodes=nodes, params=params, input=entering.pop(), output=leaving[0])
    in_shape, out_shapes = _record(block.input).shapes, _record(block.output).shapes
    if len(in_shape) != 1 or len(out_shapes) != 1 or in_shape[0] != out_shapes[0]:
        raise ValueError(f"{where} maps shapes {list(in_shape)} to {list(out_shapes)}; an expert maps "
                         "(…, h) to the same shape")
    return block


def _linear(gm: fx.GraphModule, node: fx.Node) -> nn.Linear | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)  # type: ignore[arg-type]
    return module if type(module) is nn.Linear else None


def _linear_chain(gm: fx.GraphModule, layer: int) -> Block:
    """``fc → one-input ops → proj`` of layer ``layer`` (exactly one such chain)."""
    found = []
    for fc in [n for n in gm.graph.nodes if _record(n).layer == layer and _linear(gm, n) is not None]:
        first, chain, node = _linear(gm, fc), [], fc
        while len(node.users) == 1:
            user = next(iter(node.users))
            if _record(user).layer != layer or user.all_input_nodes != [node]:
                break
            second = _linear(gm, user)
            if second is not None:
                if (second.in_features, second.out_features) == (first.out_features, first.in_features):
                    found.append((fc, chain, user))
                break
            if user.op not in ("call_function", "call_method", "call_module") or \
                    _record(user).shapes != _record(fc).shapes:
                break
            chain, node = [*chain, user], user
    if len(found) != 1:
        pairs = [(fc.target, proj.target) for fc, _, proj in found]
        raise ValueError(f"layer {layer}: found {len(found)} feed-forward blocks {pairs}; the MoE pass "
                         "needs exactly one per chosen layer: a submodule named mlp/feed_forward/ffn with "
                         "one input and one output, or nn.Linear(h, f), one-input ops (activation, dropout), "
                         "nn.Linear(f, h). Leave such layers out of MoE.layers")
    fc, chain, proj = found[0]
    path = ".".join(os.path.commonprefix([str(fc.target).split(".")[:-1], str(proj.target).split(".")[:-1]]))
    return Block(layer=layer, path=path, nodes=(fc, *chain, proj), params=(), input=fc.args[0],  # type: ignore[arg-type]
                 output=proj)


def _relative(target: str, path: str) -> str:
    name = target[len(path) + 1:] if path and target.startswith(path + ".") else target
    return re.sub(r"[^0-9A-Za-z_.]", "_", name)


def _set_nested(root: nn.Module, name: str, value: torch.Tensor | nn.Module) -> None:
    """``root.<a>.<b>.<name> = value`` (a copy of a tensor), creating plain containers on the way."""
    *parents, leaf = name.split(".")
    module = root
    for part in parents:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if isinstance(value, nn.Module):
        module.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        param = nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
        module.register_parameter(leaf, param)
    else:
        module.register_buffer(leaf, value.detach().clone())


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def expert_module(gm: fx.GraphModule, block: Block) -> fx.GraphModule:
    """``block`` as its own module ``(n, h) -> (n, h)`` with copies of its parameters and submodules."""
    root, graph = nn.Module(), fx.Graph()
    h, lead = block.hidden_size, block.leading_dims
    x = graph.placeholder("x")
    count = graph.call_function(torch.ops.aten.sym_size.int, (x, 0))
    shaped = x if len(lead) == 1 else graph.call_method("reshape", (x, (*([1] * (len(lead) - 1)), -1, h)))
    env: dict[fx.Node, fx.Node] = {block.input: shaped}
    for param in block.params:
        name = _relative(str(param.target), block.path)
        _set_nested(root, name, _attr(gm, str(param.target)))
        env[param] = graph.get_attr(name)
    for node in block.nodes:
        new = graph.node_copy(node, lambda a: env[a])
        if node.op == "call_module":
            name = _relative(str(node.target), block.path)
            _set_nested(root, name, copy.deepcopy(gm.get_submodule(node.target)))  # type: ignore[arg-type]
            new.target = name
        _rewrite_sizes(new, lead, count)
        new.meta = {}
        env[node] = new
    out = env[block.output]
    graph.output(out if len(lead) == 1 else graph.call_method("reshape", (out, (-1, h))))
    if not count.users:
        graph.erase_node(count)
    expert = fx.GraphModule(root, graph, class_name="Expert")
    expert.train(gm.training)
    _check_expert(expert, block)
    return expert


def _rewrite_sizes(node: fx.Node, lead: tuple[int, ...], count: fx.Node) -> None:
    """Literal token counts in ``node``'s size argument → the expert's ``count`` (module docstring)."""
    if node.op == "call_method" and node.target in _SIZE_METHODS:
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = tuple(sizes[0])
        new = _resized(list(sizes), lead, count)
        if new is not None:
            node.args = (node.args[0], *new)
        return
    position = _SIZE_ARG.get(str(node.target)) if node.op == "call_function" else None
    if position is not None and len(node.args) > position and isinstance(node.args[position], (list, tuple)):
        new = _resized(list(node.args[position]), lead, count)
        if new is not None:
            node.args = (*node.args[:position], new, *node.args[position + 1:])


def _resized(sizes: list, lead: tuple[int, ...], count: fx.Node) -> list | None:
    if len(lead) > 1 and tuple(sizes[:len(lead)]) == lead:
        return [*([1] * (len(lead) - 1)), count, *sizes[len(lead):]]
    if sizes and sizes[0] == math.prod(lead):
        return [count, *sizes[1:]]
    return None


def _check_expert(expert: fx.GraphModule, block: Block) -> None:
    """Run the expert on fake tokens, a count the capture never saw; its output must be (n, h)."""
    n = block.tokens + 1 + max(block.leading_dims)
    param = next(iter(expert.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            out = expert(torch.empty(n, block.hidden_size, dtype=dtype, device=device))
        shape = tuple(out.shape)
        error = None if shape == (n, block.hidden_size) else f"it returned shape {shape}"
    except Exception as err:  # noqa: BLE001 - any failure means the block is not token-wise
        error = f"{type(err).__name__}: {str(err)[:200]}"
    if error is not None:
        raise ValueError(f"layer {block.layer}'s feed-forward block {block.path or '(chain)'} does not run "
                         f"on {n} tokens as an expert (n, h) → (n, h) ({error}); it may mix tokens, or the "
                         f"token count {block.tokens} equals another dimension baked into an exported graph: "
                         "capture with a batch × sequence that differs from the hidden sizes")

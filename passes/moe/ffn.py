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
2. **Shape** (:func:`shape_block`; fx or exported graphs, whatever the modules are called): a
   projection ``down: f → h`` of the layer (``nn.Linear``, ``F.linear``/``aten.linear``, or a matmul
   by a parameter, possibly transposed), optionally followed by ops that add or scale it by
   parameters (a bias, a layer scale); before it, per-token ops on ``(…, f)`` (activation modules or
   functions, ``x · sigmoid(x)``, dropout, a gate product, a chunk of a fused gate-up projection) back
   to one or more projections ``h → f`` that all read one value x (two: SwiGLU's gate and up). Its
   output (after one-input ops such as dropout) must be added to a value of the residual stream that
   x is computed from, or that is computed from x (pre-LN, post-LN, parallel blocks); nothing but
   the block may read its intermediate values or parameters. Exactly one such block per layer (zoo
   BERT, inline user MLPs). "Per-token" is judged by shape: every value keeps the leading dims of
   ``(…, f)`` and the rank, and no matmul of two activations; an op that mixes tokens along a kept
   dim (``cumsum(dim=1)``) is not recognised as such.

Exported graphs bake the token count into reshapes (``view(x, [b, s, f])``). The expert takes
(n, h), views it as ``(1, …, 1, n, h)`` (the captured input's rank) and rewrites a size argument
that starts with the captured leading dims ``(b, s)`` to ``(1, n)``, or with their product ``b·s``
to ``n``; it is then run on fake tensors with a token count seen nowhere in the capture.
"""

from __future__ import annotations

import copy
import math
import operator
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from autopar.capture.record import META_KEY, NodeRecord
from autopar.passes.size_args import SIZE_ARG, SIZE_METHODS

FFN_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "DenseReluDense")


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
        return shape_block(gm, layer)
    except ValueError as err:
        if region_error is None:
            raise
        raise ValueError(f"{region_error}; nor by its shape: {err}") from None


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


_CALLS = ("call_function", "call_method", "call_module")
_LINEAR_FUNCTIONS = (F.linear, torch.ops.aten.linear.default)
_MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.mm, torch.ops.aten.matmul.default,
                     torch.ops.aten.mm.default)
_MIXING = (*_MATMUL_FUNCTIONS, torch.bmm, torch.einsum, torch.ops.aten.bmm.default,
           torch.ops.aten.einsum.default)  # products of two activations mix tokens
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor,
                  torch.ops.aten.add_.Tensor)
_ADD_METHODS = ("add", "add_", "__add__", "__iadd__")
_MAX_HOPS = 8  # one-input ops (dropout) between a block's output and its residual add
LOOKED_FOR = ("a submodule named mlp/feed_forward/ffn/DenseReluDense with one input and one output, or the "
              "shape x → linear h→f (nn.Linear, F.linear or a matmul by a parameter) → per-token ops (an "
              "activation, dropout, optionally times a second linear h→f as in SwiGLU) → linear f→h, whose "
              "input x comes from the residual stream its output is added back to")


@dataclass(frozen=True)
class _Projection:
    """``node = input · W (+ b)`` over the last dim with W a parameter: nn.Linear, F.linear, ``x @ W``."""

    node: fx.Node
    input: fx.Node

    @property
    def dims(self) -> tuple[int, int]:
        return _record(self.input).shapes[0][-1], _record(self.node).shapes[0][-1]


def _is_param(node: fx.Node) -> bool:
    """A parameter (or buffer) read, or an op on such reads only (``w.t()``, ``w.to(dtype)``)."""
    if node.op == "get_attr":
        return True
    inputs = node.all_input_nodes
    return node.op in ("call_function", "call_method") and bool(inputs) and all(map(_is_param, inputs))


def _is_matmul(node: fx.Node, functions: tuple = _MATMUL_FUNCTIONS) -> bool:
    return (node.op == "call_function" and node.target in functions) or \
        (node.op == "call_method" and node.target in ("matmul", "__matmul__", "mm", "bmm"))


def _projection(gm: fx.GraphModule, node: fx.Node) -> _Projection | None:
    if node.op == "call_module":
        if not isinstance(gm.get_submodule(str(node.target)), nn.Linear) or not node.args:
            return None
        weights: tuple = ()
    elif (node.op == "call_function" and node.target in _LINEAR_FUNCTIONS) or _is_matmul(node):
        if len(node.args) < 2:
            return None
        weights = tuple(w for w in node.args[1:3 if node.target in _LINEAR_FUNCTIONS else 2] if w is not None)
    else:
        return None
    x = node.args[0]
    if not isinstance(x, fx.Node) or not all(isinstance(w, fx.Node) and _is_param(w) for w in weights):
        return None
    x_shapes, y_shapes = _record(x).shapes, _record(node).shapes
    if len(x_shapes) != 1 or len(y_shapes) != 1 or not x_shapes[0] or x_shapes[0][:-1] != y_shapes[0][:-1]:
        return None
    return _Projection(node, x)


def shape_block(gm: fx.GraphModule, layer: int) -> Block:
    """Layer ``layer``'s feed-forward block found by its shape (module docstring); ValueError otherwise."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    projections = {n: p for n in order if _record(n).layer == layer and (p := _projection(gm, n)) is not None}
    found, rejected = [], []
    for down in projections.values():
        try:
            found.append(_block_ending_at(down, layer, projections, order))
        except ValueError as why:
            rejected.append(f"{down.node.name} ({_what(down.node)}): {why}")
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"layer {layer} has {len(found)} feed-forward blocks, ending at "
                         f"{[b.output.name for b in found]}; the MoE pass replaces one per layer: leave this "
                         "layer out of MoE.layers")
    why = "; ".join(rejected) if rejected else "it has no linear layer or matmul by a parameter"
    raise ValueError(f"layer {layer}: found no feed-forward block; looked for {LOOKED_FOR} ({why}). Leave "
                     "such layers out of MoE.layers")


def _what(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
    return f"{node.op} {target}"


def _block_ending_at(down: _Projection, layer: int, projections: dict[fx.Node, _Projection],
                     order: dict[fx.Node, int]) -> Block:
    """The block whose f → h projection is ``down``; ValueError saying why there is none."""
    output = _tail(down.node, layer)
    streams = _residual_streams(output)
    middle, ups = _between(down, layer, projections)
    x = ups[0].input
    if any(up.input is not x for up in ups):
        raise ValueError(f"its h → f projections read different values {sorted({u.input.name for u in ups})}")
    in_shapes, out_shapes = _record(x).shapes, _record(output).shapes
    if in_shapes != out_shapes:
        raise ValueError(f"it maps {list(in_shapes)} to {list(out_shapes)}; an expert maps (…, h) to the "
                         "same shape")
    if not any(s in _ancestors(x, layer) or x in _ancestors(s, layer) for s in streams):
        raise ValueError(f"its input {x.name} is not taken from the residual stream its output is added to")
    members = {*middle, *(u.node for u in ups), down.node}
    node = down.node
    while node is not output:
        node = next(iter(node.users))
        members.add(node)
    weights = _weights(members)
    inside = members | weights
    for node in inside - {output}:
        outside = [u.name for u in node.users if u not in inside]
        if outside:
            what = "shares parameter" if node in weights else "has an intermediate value"
            raise ValueError(f"it {what} {node.name} with the rest of the model ({outside}); experts need "
                             "their own copies")
    params = sorted((n for n in weights if n.op == "get_attr"), key=order.__getitem__)
    nodes = sorted(inside - set(params), key=order.__getitem__)
    path = ".".join(os.path.commonprefix([_record(n).module_path.split(".") for n in (*params, *nodes)]))
    return Block(layer=layer, path=path, nodes=tuple(nodes), params=tuple(params), input=x, output=output)


def _tail(node: fx.Node, layer: int) -> fx.Node:
    """``node`` followed through its only user while that adds or scales it by parameters (a bias, a
    layer scale)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        others = [a for a in user.all_input_nodes if a is not node]
        record = _record(user)
        if user.op not in _CALLS or record.layer != layer or record.shapes != _record(node).shapes \
                or not others or not all(map(_is_param, others)):
            break
        node = user
    return node


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or \
        (node.op == "call_method" and node.target in _ADD_METHODS)


def _residual_streams(output: fx.Node) -> list[fx.Node]:
    """The values that ``output`` (after one-input ops such as dropout) is added to; ValueError if none."""
    node = output
    for _ in range(_MAX_HOPS):
        shapes = _record(node).shapes
        streams = [a for u in node.users if _is_add(u) for a in u.all_input_nodes
                   if a is not node and _record(a).shapes == shapes]
        if streams:
            return streams
        users = list(node.users)
        if len(users) != 1 or users[0].all_input_nodes != [node] or _record(users[0]).shapes != shapes:
            break
        node = users[0]
    raise ValueError("its output is not added back to the residual stream")


def _between(down: _Projection, layer: int, projections: dict[fx.Node, _Projection]
             ) -> tuple[list[fx.Node], list[_Projection]]:
    """The per-token ops between ``down`` and the h → f projections that feed it, and those projections."""
    f_shape, h = _record(down.input).shapes[0], down.dims[1]
    middle, ups, seen, stack = [], [], set(), [down.input]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        up = projections.get(node)
        if up is not None:
            if up.dims[0] != h:
                raise ValueError(f"{node.name} ({_what(node)}) inside it reads {up.dims[0]} features, "
                                 f"not h = {h}")
            ups.append(up)
            continue
        if _is_param(node):
            continue
        record = _record(node)
        per_token = bool(record.shapes) and all(len(s) == len(f_shape) and s[:-1] == f_shape[:-1]
                                                for s in record.shapes)
        if node.op not in _CALLS or record.layer != layer or not per_token or _is_matmul(node, _MIXING):
            raise ValueError(f"{node.name} ({_what(node)}, shapes {list(record.shapes)}) before it is not a "
                             f"per-token op on (…, f) = {list(f_shape)} fed by a linear h → f")
        middle.append(node)
        stack.extend(node.all_input_nodes)
    if not ups:
        raise ValueError("no linear h → f feeds it")
    return middle, ups


def _weights(members: set[fx.Node]) -> set[fx.Node]:
    """The parameter reads (and ops on them, ``w.t()``) that ``members`` use."""
    found: set[fx.Node] = set()
    stack = [a for n in members for a in n.all_input_nodes if a not in members and _is_param(a)]
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack.extend(node.all_input_nodes)
    return found


def _ancestors(node: fx.Node, layer: int) -> set[fx.Node]:
    """``node`` and the values it is computed from within layer ``layer`` (and that layer's inputs)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current is node or _record(current).layer == layer:
            stack.extend(current.all_input_nodes)
    return seen


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
    if node.op == "call_method" and node.target in SIZE_METHODS:
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = tuple(sizes[0])
        new = _resized(list(sizes), lead, count)
        if new is not None:
            node.args = (node.args[0], *new)
        return
    position = SIZE_ARG.get(str(node.target)) if node.op == "call_function" else None
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

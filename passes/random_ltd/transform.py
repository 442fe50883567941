"""Random layerwise token dropping (random-LTD; Yao et al. 2022, DeepSpeed Data Efficiency).

Data flow: ``autopar.capture`` → annotated graph → :func:`random_ltd_pass` (behind the
:class:`RandomLTD` config) → a graph in which each chosen repeated layer runs on a random,
sorted subset of ``k`` of its ``s`` tokens per sample, and the planner/cost model read the
kept fractions (:func:`kept_fractions`, :func:`ltd_profile`). Run-time pieces (schedule,
state, gather/scatter ops) live in ``ltd_schedule.py``.

For layer ℓ the pass finds its boundary: the values entering its nodes from outside (the
residual stream ``(b, s, h)``, which is also the shape of the one value leaving it, plus
per-token inputs such as attention masks ``(b, 1, 1|s, s)`` and rotary tables ``(1, s, d)``)
and the value leaving it. It inserts ``kept = random_ltd(x, ℓ)``, gathers every entering
value along its sequence dims, rewrites literal sequence lengths in the layer's reshapes
(export graphs bake them) to the gathered length, and scatters the output back into ``x``.
When every token is kept, ``kept`` is None and the inserted ops return their inputs, so
the graph computes exactly what the captured one does. The rewritten graph is checked by
running it on fake tensors at two kept lengths.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map

from autopar.capture.record import META_KEY, NodeRecord
from autopar.cost_models.profile import ModelProfile
from autopar.cost_models.token_dropping import ltd_profile
from autopar.passes.random_ltd.schedule import (
    RandomLTDRuntime,
    kept_tokens,
    ltd_gather,
    ltd_scatter,
    ltd_seq_len,
    mean_kept_fraction,
)
from autopar.passes.runner import PassContext
from autopar.passes.size_args import SIZE_ARG, SIZE_METHODS
from autopar.quiet import quiet_logger

RUNTIME = "random_ltd"
RECORD_KEY = "autopar_random_ltd"



@dataclass(frozen=True, kw_only=True)
class RandomLTD:
    """Random-LTD on repeated layers: ``autopar.transform(model, x, passes=[RandomLTD(...)])``.

    ``min_tokens`` (DeepSpeed ``min_value``): tokens kept per sample at step 0; the kept length
    grows linearly to the full sequence over ``num_steps`` (``require_steps``), in multiples of
    ``granularity`` (``seq_per_step``). ``layers``: indices of the repeated layers that drop
    tokens (default: all but the first and the last). ``seed`` fixes the token choices.
    """

    name: ClassVar[str] = "random_ltd"

    min_tokens: int
    num_steps: int
    granularity: int = 1
    layers: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for field_name in ("min_tokens", "num_steps", "granularity"):
            value = getattr(self, field_name)
            if type(value) is not int or value < 1:
                raise ValueError(f"RandomLTD.{field_name} = {value!r} is invalid: expected an int >= 1")
        if type(self.seed) is not int or self.seed < 0:
            raise ValueError(f"RandomLTD.seed = {self.seed!r} is invalid: expected an int >= 0")
        if self.layers is not None:
            layers = tuple(self.layers) if isinstance(self.layers, (list, tuple, range)) else None
            valid = bool(layers) and all(type(i) is int and i >= 0 for i in layers)  # type: ignore[union-attr]
            if not valid or len(set(layers)) != len(layers):  # type: ignore[arg-type]
                raise ValueError(f"RandomLTD.layers = {self.layers!r} is invalid: expected None (all but the "
                                 "first and last layer) or distinct layer indices >= 0, e.g. (1, 2, 3)")
            object.__setattr__(self, "layers", tuple(sorted(layers)))

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        return random_ltd_pass(gm, ctx, config=self)

    def time_profile(self, profile: ModelProfile, gm: fx.GraphModule) -> ModelProfile:
        """The profile to price time with: each dropping layer at the schedule's average kept
        fraction (``cost_models.token_dropping``); memory stays priced at full length."""
        kept = kept_fractions(gm)
        return ltd_profile(profile, kept) if kept else profile


@dataclass(frozen=True, kw_only=True)
class RandomLTDRecord:
    """What the pass did, in ``gm.meta["autopar_random_ltd"]``: read by the cost model and planner.

    ``expected_kept_fraction`` is k/s averaged over the dropping phase (steps 0 … num_steps − 1).
    """

    layers: tuple[int, ...]
    num_layers: int
    seq_len: int
    min_tokens: int
    num_steps: int
    granularity: int
    seed: int
    expected_kept_fraction: float

    def kept_fractions(self, step: int | None = None) -> dict[int, float]:
        """Layer → kept fraction: the phase average, or at ``step``."""
        if step is None:
            return dict.fromkeys(self.layers, self.expected_kept_fraction)
        k = kept_tokens(step, seq_len=self.seq_len, min_tokens=self.min_tokens, num_steps=self.num_steps,
                        granularity=self.granularity)
        return dict.fromkeys(self.layers, k / self.seq_len)


class _ProbeError(ValueError):
    """The rewritten graph failed on fake tensors keeping fewer tokens."""


@dataclass(frozen=True)
class _Boundary:
    """One layer's entering values (node, sequence dims to gather) and the value leaving it."""

    hidden: fx.Node
    entering: tuple[tuple[fx.Node, tuple[int, ...]], ...]
    output: fx.Node
    inside: frozenset[fx.Node]


def _record(node: fx.Node) -> NodeRecord:
    return node.meta[META_KEY]


def random_ltd_runtime(gm: fx.GraphModule) -> RandomLTDRuntime | None:
    """The runtime the pass installed (``.set_step``, ``.advance``, ``.state_dict``), or None."""
    runtime = getattr(gm, RUNTIME, None)
    return runtime if isinstance(runtime, RandomLTDRuntime) else None


def kept_fractions(gm: fx.GraphModule, *, step: int | None = None) -> dict[int, float]:
    """Layer → kept fraction recorded by the pass ({} when it did not run)."""
    record = gm.meta.get(RECORD_KEY)
    return record.kept_fractions(step) if isinstance(record, RandomLTDRecord) else {}


def random_ltd_pass(gm: fx.GraphModule, ctx: PassContext, *, config: RandomLTD) -> fx.GraphModule:
    """Make the chosen layers of ``gm`` run on random kept tokens (see the module docstring)."""
    if random_ltd_runtime(gm) is not None:
        raise ValueError("random-LTD was already applied to this graph; pass RandomLTD(...) once")
    missing = [n.name for n in gm.graph.nodes if META_KEY not in n.meta]
    if missing:
        raise ValueError(f"nodes {missing[:3]} have no autopar annotation; run random-LTD on a graph from "
                         "autopar.capture (or autopar.transform), before passes that add unannotated nodes")
    names = _layer_names(gm, ctx)
    layers = _chosen_layers(config, len(names))
    for multiples in (False, True):  # token counts s and b·s only; then also c·b·s (a MoE router's)
        saved = _snapshot(gm.graph)
        try:
            runtime = _rewrite_layers(gm, ctx, config, layers, names, multiples=multiples)
            _check_shapes(gm, ctx, runtime)
            break
        except Exception as err:
            gm.graph = saved
            if hasattr(gm, RUNTIME):
                delattr(gm, RUNTIME)
            gm.recompile()
            if not isinstance(err, _ProbeError) or multiples:
                raise
    s = runtime.seq_len
    gm.meta[RECORD_KEY] = RandomLTDRecord(
        layers=layers, num_layers=len(names), seq_len=s, min_tokens=config.min_tokens,
        num_steps=config.num_steps, granularity=config.granularity, seed=config.seed,
        expected_kept_fraction=mean_kept_fraction(seq_len=s, min_tokens=config.min_tokens,
                                                  num_steps=config.num_steps, granularity=config.granularity))
    gm.graph.lint()
    gm.recompile()
    return gm


def _snapshot(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` to restore when the pass fails (sharing the codegen, which it leaves alone)."""
    copied = fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    copied._codegen = graph._codegen
    output = copied.output(copied.graph_copy(graph, {}))
    output.meta = dict(next(reversed(graph.nodes)).meta)
    return copied


def _layer_names(gm: fx.GraphModule, ctx: PassContext) -> list[str]:
    """The name of every repeated layer, by index."""
    captured = ctx.captured
    if captured is not None and getattr(captured, "layers", None):
        return [info.name for info in captured.layers]
    indices = {_record(n).layer for n in gm.graph.nodes} - {None}
    return [f"layer {i}" for i in range(max(indices) + 1)] if indices else []  # type: ignore[type-var]


def _rewrite_layers(gm: fx.GraphModule, ctx: PassContext, config: RandomLTD, layers: tuple[int, ...],
                    names: list[str], *, multiples: bool) -> RandomLTDRuntime:
    runtime = None
    for layer in layers:
        boundary = _boundary(gm, layer)
        if runtime is None:
            runtime = _install_runtime(gm, config, boundary, len(names), layers, ctx.step)
        _rewrite(gm, layer, boundary, runtime.seq_len, names[layer], multiples=multiples)
    assert runtime is not None
    gm.graph.lint()
    gm.recompile()
    return runtime


def _chosen_layers(config: RandomLTD, num_layers: int) -> tuple[int, ...]:
    if config.layers is None:
        if num_layers < 3:
            raise ValueError(f"the model has {num_layers} repeated layer(s); random-LTD's default keeps the "
                             "first and last layer whole, so it needs >= 3, or pass layers=(...) explicitly")
        return tuple(range(1, num_layers - 1))
    bad = [i for i in config.layers if i >= num_layers]
    if bad:
        raise ValueError(f"RandomLTD.layers = {config.layers} names layer(s) {bad}, but the model has "
                         f"{num_layers} repeated layers: expected indices in [0, {num_layers})")
    return config.layers


def _boundary(gm: fx.GraphModule, layer: int) -> _Boundary:
    nodes = [n for n in gm.graph.nodes if _record(n).layer == layer]
    inside = frozenset(nodes)
    body = [n for n in nodes if n.op.startswith("call")]
    entering = list(dict.fromkeys(a for n in body for a in n.all_input_nodes
                                  if a not in inside and a.op != "get_attr"))
    leaving = [n for n in nodes if any(user not in inside for user in n.users)]
    if len(leaving) != 1:
        raise ValueError(f"layer {layer} passes {len(leaving)} values to the rest of the graph "
                         f"({[n.name for n in leaving]}); random-LTD needs layers whose one output is the "
                         "hidden states: disable caches and attention outputs (use_cache=False), and leave "
                         "out of layers= a layer that computes values for later layers (as T5's first "
                         "block computes the position bias)")
    output = leaving[0]
    shape = _single_shape(output)
    if shape is None or len(shape) < 2:
        raise ValueError(f"layer {layer}'s output {output.name} is not a (batch, sequence, ...) tensor "
                         f"(shapes {_record(output).shapes}); random-LTD needs sequence layers")
    positions = [n.name for n in body if "arange" in str(n.target) and _single_shape(n) == (shape[1],)]
    if positions:
        raise ValueError(f"layer {layer} computes positions inside (nodes {positions}); with random-LTD "
                         "its kept tokens would get positions 0…k−1 instead of their own: compute positions "
                         "before the layers and pass them in (as GPT-2, BERT and Llama do), or leave this "
                         "layer out of layers=")
    candidates = [a for a in entering if _single_shape(a) == shape]
    if len(candidates) != 1:
        raise ValueError(f"layer {layer}: cannot tell the hidden states among its inputs "
                         f"{[(a.name, _record(a).shapes) for a in entering]}: expected exactly one of the "
                         f"output's shape {shape}")
    hidden = candidates[0]
    b, s = shape[0], shape[1]
    gathered = [(hidden, (1,))]
    for value in entering:
        if value is not hidden:
            dims = _sequence_dims(value, b, s, layer)
            if dims:
                gathered.append((value, dims))
    return _Boundary(hidden=hidden, entering=tuple(gathered), output=output, inside=inside)


def _single_shape(node: fx.Node) -> tuple[int, ...] | None:
    shapes = _record(node).shapes
    return tuple(shapes[0]) if len(shapes) == 1 else None


def _sequence_dims(value: fx.Node, b: int, s: int, layer: int) -> tuple[int, ...]:
    """Dims of a per-token input to gather: every dim after the batch dim whose size is s."""
    shapes = _record(value).shapes
    if len(shapes) > 1 and any(s in shape for shape in shapes):
        raise ValueError(f"layer {layer} takes {value.name}, a tuple of tensors {shapes}; random-LTD can "
                         "gather only single tensors that enter a layer")
    if not shapes or not shapes[0]:
        return ()
    shape = shapes[0]
    dims = tuple(d for d in range(1, len(shape)) if shape[d] == s)
    if dims and shape[0] not in (b, 1):
        raise ValueError(f"layer {layer} takes {value.name} of shape {shape}, which has the sequence length "
                         f"{s} but no leading batch dim (size {b} or 1); random-LTD cannot gather it per "
                         "sample: give per-token inputs a batch dim")
    return dims


def _install_runtime(gm: fx.GraphModule, config: RandomLTD, boundary: _Boundary, num_layers: int,
                     layers: tuple[int, ...], step: int) -> RandomLTDRuntime:
    s = _single_shape(boundary.output)[1]  # type: ignore[index]
    if config.min_tokens > s:
        raise ValueError(f"RandomLTD.min_tokens = {config.min_tokens} exceeds the sequence length {s}: "
                         f"expected 1 <= min_tokens <= {s}")
    runtime = RandomLTDRuntime(min_tokens=config.min_tokens, num_steps=config.num_steps,
                               granularity=config.granularity, seed=config.seed, seq_len=s,
                               num_layers=num_layers, layers=layers, step=step)
    gm.add_submodule(RUNTIME, runtime)
    return runtime


def _new(graph: fx.Graph, op: str, target: Any, args: tuple[Any, ...], record: NodeRecord) -> fx.Node:
    node = graph.create_node(op, target, args)
    node.meta[META_KEY] = record
    return node


def _rewrite(gm: fx.GraphModule, layer: int, boundary: _Boundary, s: int, path: str, *, multiples: bool
             ) -> None:
    graph, inside = gm.graph, boundary.inside
    order = {n: i for i, n in enumerate(graph.nodes)}
    users = {value: [n for n in value.users if n in inside] for value, _ in boundary.entering}
    length = _single_shape(boundary.output)[1]  # type: ignore[index]
    if length != s:
        raise ValueError(f"layer {layer} sees sequence length {length}, other layers {s}: random-LTD needs "
                         "one sequence length through the chosen layers")
    first = min((u for group in users.values() for u in group), key=order.__getitem__)
    if order[boundary.hidden] >= order[first]:
        raise ValueError(f"layer {layer} uses a per-token input before its hidden states exist; "
                         "random-LTD cannot place the token choice")

    def record(shapes: tuple[tuple[int, ...], ...], dtypes: tuple[str, ...]) -> NodeRecord:
        return NodeRecord(shapes=shapes, dtypes=dtypes, flops_fwd=0, flops_bwd=0, bytes_read=0,
                          bytes_written=0, param_bytes=0, module_path=path, layer=layer)

    with graph.inserting_before(first):
        kept = _new(graph, "call_module", RUNTIME, (boundary.hidden, layer), record((), ()))
    gathered = {}
    for value, dims in boundary.entering:
        first_use = min(users[value], key=order.__getitem__)
        with graph.inserting_before(first if value is boundary.hidden else first_use):
            rec = _record(value)
            gathered[value] = _new(graph, "call_function", ltd_gather, (value, kept, dims),
                                   record(rec.shapes, rec.dtypes))
        for user in users[value]:
            user.replace_input_with(value, gathered[value])
    _rewrite_sizes(graph, boundary, gathered[boundary.hidden], s, record, multiples=multiples)
    with graph.inserting_after(boundary.output):
        rec = _record(boundary.output)
        scattered = _new(graph, "call_function", ltd_scatter, (boundary.hidden, boundary.output, kept),
                         record(rec.shapes, rec.dtypes))
    boundary.output.replace_all_uses_with(
        scattered, delete_user_cb=lambda user: user not in inside and user is not scattered)


def _size_arg(node: fx.Node) -> tuple[int, list[Any]] | None:
    """(position in args, the shape as a list) of a reshape/expand/factory node; (−1, sizes) for
    varargs methods, (−2, [end]) for ``arange(end)``; else None."""
    target = str(node.target)
    if node.op == "call_function" and (target == "aten.arange.default" or node.target is torch.arange):
        return (-2, [node.args[0]]) if len(node.args) == 1 else None
    if node.op == "call_function" and target in SIZE_ARG:
        position = SIZE_ARG[target]
    elif node.op == "call_function" and node.target is torch.reshape:
        position = 1
    elif node.op == "call_method" and node.target in SIZE_METHODS:
        if not (len(node.args) == 2 and isinstance(node.args[1], (list, tuple))):
            return -1, list(node.args[1:])
        position = 1
    else:
        return None
    if len(node.args) <= position or not isinstance(node.args[position], (list, tuple)):
        return None
    return position, list(node.args[position])


def _rewrite_sizes(graph: fx.Graph, boundary: _Boundary, hidden: fx.Node, s: int, record: Any, *,
                   multiples: bool) -> None:
    """Literal token counts in the layer's shapes and ``arange`` ends → the same multiple of the
    gathered length, where the output dim has that size: s and b·s (tokens flattened over the
    batch); with ``multiples``, in shapes without an s, also c·b·s (a Mixture-of-Experts router's
    ``arange(b·s·top_k)``)."""
    b = _single_shape(boundary.output)[0]  # type: ignore[index]
    lengths: dict[int, fx.Node] = {}

    def length(multiple: int) -> fx.Node:
        if 1 not in lengths:
            with graph.inserting_after(hidden):
                lengths[1] = _new(graph, "call_function", ltd_seq_len, (hidden,), record((), ()))
        if multiple not in lengths:
            with graph.inserting_after(lengths[1]):
                lengths[multiple] = _new(graph, "call_function", operator.mul, (multiple, lengths[1]),
                                         record((), ()))
        return lengths[multiple]

    def multiple_of_s(size: Any, out: int, sizes: list[Any]) -> int | None:
        if type(size) is not int or size != out or size <= 0:
            return None
        if size in (s, b * s):
            return size // s
        if multiples and s not in sizes and size % (b * s) == 0:
            return size // s
        return None

    for node in [n for n in graph.nodes if n in boundary.inside]:
        found, shape = _size_arg(node), _single_shape(node)
        if found is None or shape is None or len(found[1]) != len(shape):
            continue
        position, sizes = found
        scales = [multiple_of_s(size, out, sizes) for size, out in zip(sizes, shape, strict=True)]
        if not any(scales):
            continue
        new = [size if m is None else length(m) for size, m in zip(sizes, scales, strict=True)]
        if position == -2:
            node.args = (new[0],)
        elif position == -1:
            node.args = (node.args[0], *new)
        else:
            node.args = (*node.args[:position], new, *node.args[position + 1:])


def _check_shapes(gm: fx.GraphModule, ctx: PassContext, runtime: RandomLTDRuntime) -> None:
    """Run the rewritten graph on the example inputs keeping fewer tokens; an error means a layer's
    shapes could not be made to follow the kept length. Real tensors (no gradients; buffers and
    random state restored) catch data-dependent shapes too; models on ``meta`` run on fake tensors."""
    captured = ctx.captured
    s = runtime.seq_len
    if captured is None or s < 3:
        return
    inputs = (captured.example_args, captured.example_kwargs)
    tensors = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)] + list(gm.parameters())
    on_meta = any(t.device.type == "meta" for t in tensors)
    for probe in sorted({s // 2 + 1, s - 1}):
        quiet = quiet_logger("torch._subclasses.fake_tensor")  # the failure is raised as a ValueError
        with runtime.probing(probe), quiet, _untouched(gm, tensors, on_meta) as convert:
            args, kwargs = tree_map(lambda v: convert(v) if isinstance(v, torch.Tensor) else v, inputs)
            try:
                gm(*args, **kwargs)
            except Exception as err:
                raise _ProbeError(
                    f"random-LTD could not make layers {runtime.layers} of {captured.model_name} run on "
                    f"{probe} of {s} tokens: {type(err).__name__}: {str(err)[:300]}. The layers may compute "
                    f"positions inside (random-LTD needs them computed before the layers and passed in), or "
                    f"the sequence length {s} equals another dimension baked into an exported graph: capture "
                    "with a sequence length that differs from the hidden, head and batch sizes") from None


@contextlib.contextmanager
def _untouched(gm: fx.GraphModule, tensors: list[torch.Tensor], fake: bool) -> Iterator[Any]:
    """A context for one probe run that leaves the model as it was; yields the input conversion."""
    if fake:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode.from_tensor
        return
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    saved = [(buffer, buffer.detach().clone()) for buffer in gm.buffers()]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            yield lambda t: t
        finally:
            for buffer, copy in saved:
                buffer.copy_(copy)

"""Cut a captured graph into pipeline-stage modules at a Plan's layer boundaries.

Data flow: ``Captured.graph_module`` + the Plan's ``stages`` (layer ranges) →
:func:`split_stages` → one ``fx.GraphModule`` per stage. Stage k takes, in order,
every value that crosses the boundary into it (activations, and model inputs that
later layers still need, such as an attention mask) and returns every value that
crosses the boundary out of it, so ``torch.distributed.pipelining`` can pass one
tuple between adjacent stages. Nodes outside any layer go with the layer before
them (the first stage takes what precedes layer 0: embeddings; the last stage what
follows the last layer: final norm, LM head). Parameters used by several stages
(tied embeddings) are copied into each; :func:`shared_parameters` names them so the
runtime can sum their gradients.

``torch.fx.passes.split_module`` does the node bookkeeping for arbitrary partitions
but wires partition i's outputs straight to any later partition; a pipeline needs
values relayed stage by stage, which is what this module adds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from torch import fx

from autopar.capture.record import META_KEY


@dataclass(frozen=True)
class StageGraph:
    """One stage's module and the names of the values it receives and sends."""

    index: int
    module: fx.GraphModule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    is_last: bool


def check_stage_layers(num_layers: int, ranges: Sequence[tuple[int, int]]) -> None:
    """Pipeline stages' layer ranges must tile the model's layers in order, none empty."""
    if len(ranges) < 2:
        return
    ordered = sorted(ranges)
    starts = [0] + [hi for _, hi in ordered[:-1]]
    tiled = [lo for lo, _ in ordered] == starts and ordered[-1][1] == num_layers
    if not tiled or any(lo == hi for lo, hi in ranges):
        raise ValueError(f"the plan's stage layers {list(ranges)} do not split this model's {num_layers} "
                         f"layers into consecutive non-empty ranges [0, a), [a, b), …, [z, {num_layers}); "
                         "re-plan for this model, or fix the plan's stage layers")


def assign_stages(gm: fx.GraphModule, layer_ranges: Sequence[tuple[int, int]]) -> dict[fx.Node, int]:
    """Stage index of every non-output node; raises if the order is not monotonic."""
    stage_of_layer = {layer: k for k, (lo, hi) in enumerate(layer_ranges) for layer in range(lo, hi)}
    assignment: dict[fx.Node, int] = {}
    current = 0
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        record = node.meta.get(META_KEY)
        layer = None if record is None else record.layer
        if layer is not None and node.op not in ("placeholder", "get_attr"):
            if layer not in stage_of_layer:
                raise ValueError(f"layer {layer} (node {node.name}) is in no stage of {list(layer_ranges)}")
            if stage_of_layer[layer] < current:
                raise ValueError(
                    f"node {node.name} of layer {layer} runs after stage {current} began; "
                    "the model's layers do not execute in order, so it cannot be pipelined here"
                )
            current = stage_of_layer[layer]
        assignment[node] = current
    _place_inputs(gm, assignment)
    return assignment


def _place_inputs(gm: fx.GraphModule, assignment: dict[fx.Node, int]) -> None:
    """Placeholders live on stage 0; attributes on the first stage that uses them. An unused
    attribute that is another name of a used one (a tied weight the capture reads under one name,
    e.g. HF BERT's ``cls.predictions.bias`` = ``cls.predictions.decoder.bias``) goes with that
    name, so no stage holds a weight it never uses; any other unused attribute stays on stage 0."""
    first_use: dict[int, int] = {}
    unused = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            assignment[node] = 0
        elif node.op == "get_attr":
            users = [assignment[u] for u in node.users if u.op != "output"]
            if users:
                assignment[node] = min(users)
                key = id(attrgetter(node.target)(gm))
                first_use[key] = min(first_use.get(key, assignment[node]), assignment[node])
            else:
                unused.append(node)
    for node in unused:
        assignment[node] = first_use.get(id(attrgetter(node.target)(gm)), 0)


def split_stages(gm: fx.GraphModule, layer_ranges: Sequence[tuple[int, int]],
                 constants: Mapping[str, Any] | None = None) -> list[StageGraph]:
    """One GraphModule per stage, relaying crossing values from stage to stage.

    ``constants`` maps placeholder names to non-tensor input values (an unpassed
    ``attention_mask=None``); they are baked into the stages instead of being sent.
    """
    fixed = {n: constants[n.name] for n in gm.graph.nodes
             if n.op == "placeholder" and constants and n.name in constants}
    assignment = assign_stages(gm, layer_ranges)
    num_stages = len(layer_ranges)
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    last_use: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        for user in node.users:
            where = num_stages - 1 if user is output_node else assignment[user]
            last_use[node] = max(last_use.get(node, 0), where)
    stages = []
    for k in range(num_stages):
        sent = [n for n in gm.graph.nodes if n in assignment and n.op != "get_attr" and n not in fixed]
        crossing_in = [n for n in sent if assignment[n] < k <= last_use.get(n, -1)]
        crossing_out = [n for n in sent if assignment[n] <= k < last_use.get(n, -1)]
        own = [n for n in gm.graph.nodes if assignment.get(n) == k
               or (n.op == "get_attr" and _used_in(n, assignment, k))]
        stages.append(_build_stage(gm, k, num_stages, own, crossing_in, crossing_out, output_node, fixed))
    return stages


def _used_in(node: fx.Node, assignment: dict[fx.Node, int], k: int) -> bool:
    return any(assignment.get(u) == k for u in node.users)


def _build_stage(
    gm: fx.GraphModule, k: int, num_stages: int, own: list[fx.Node],
    crossing_in: list[fx.Node], crossing_out: list[fx.Node], output_node: fx.Node,
    fixed: dict[fx.Node, Any],
) -> StageGraph:
    graph = fx.Graph()
    env: dict[fx.Node, Any] = dict(fixed)
    for node in crossing_in:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in own:
        if node.op == "placeholder" and (k > 0 or node in fixed):
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    is_last = k == num_stages - 1
    if is_last:
        graph.output(fx.node.map_arg(output_node.args[0], lambda n: env[n]))
    else:
        _require_tensors(crossing_out, k)
        # torch's pipelining receives into buffers with the sent tensor's strides, and gloo/NCCL
        # refuse non-contiguous ones (a transposed or expanded value, e.g. BERT's attention mask)
        graph.output(tuple(_contiguous(graph, env[n], n) for n in crossing_out))
    module = fx.GraphModule(gm, graph, f"{type(gm).__name__}Stage{k}")
    return StageGraph(k, module, tuple(n.name for n in crossing_in),
                      tuple(n.name for n in crossing_out), is_last)


def _contiguous(graph: fx.Graph, value: fx.Node, source: fx.Node) -> fx.Node:
    """``value.contiguous()``, annotated as ``source`` (same tensor; a copy at most, no FLOPs); a
    value this stage only relays arrived contiguous and is sent on as it is."""
    if value.op == "placeholder":
        return value
    node = graph.call_method("contiguous", (value,))
    record = source.meta.get(META_KEY)
    if record is not None:
        node.meta[META_KEY] = dataclasses.replace(record, flops_fwd=0, flops_bwd=0, bytes_read=0,
                                                  bytes_written=0, param_bytes=0)
    return node


def _require_tensors(nodes: list[fx.Node], k: int) -> None:
    for node in nodes:
        record = node.meta.get(META_KEY)
        if record is not None and len(record.shapes) != 1:
            raise ValueError(
                f"value {node.name} crosses from stage {k} to {k + 1} but is not one tensor "
                f"(shapes {record.shapes}); pipeline stages can only pass tensors — move the "
                "stage boundary or compute it inside the layer"
            )


def shared_parameters(stages: Sequence[StageGraph]) -> list[tuple[tuple[int, str], ...]]:
    """Parameters that several stages use (tied weights), found by identity in the
    captured model: each group lists ``(stage index, parameter name in that stage)``."""
    groups: dict[int, list[tuple[int, str]]] = {}
    for stage in stages:
        for name, param in stage.module.named_parameters(remove_duplicate=False):
            entries = groups.setdefault(id(param), [])
            if all(index != stage.index for index, _ in entries):
                entries.append((stage.index, name))
    return [tuple(entries) for entries in groups.values() if len(entries) > 1]

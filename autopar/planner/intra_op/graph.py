"""From an annotated fx graph to the intra-op ILP's arrays: anchors, followers and ties.

Data flow: ``intra_op.solve_intra_op`` → :func:`build_problem` (walks the graph with
``layouts`` and prices strategies with ``strategies``) → ``ilp.ShardingProblem``
plus a :class:`GraphMapping` → ``ilp.solve_sharding_ilp`` → back to node names.

Merging, so the ILP stays small (Alpa, Zheng et al. OSDI 2022, §4.2 merges simple ops into
their operands; repeated layers share variables as AutoParallel's clustering does):

* An *anchor* is a node whose output layout is a choice (linear, embedding, attention) or
  is fixed (placeholders, attributes, LayerNorm and other ops that need replicated inputs).
* A *follower* (elementwise, view, split, softmax) has no variables: its layout is a
  function of its leading (largest) input's anchor's strategy, so its compute and any
  all-gather it forces are charged to that anchor, and each other operand becomes an edge
  to that anchor.
* Edges to a single-strategy anchor fold into the other side's unary cost.
* *Ties*: nodes sharing one weight (a tied embedding and LM head) must place it alike, and
  the i-th decision node of each isomorphic repeated layer (same relative module path, op,
  strategies and shapes, layer by layer; ``NodeRecord.layer``) shares the first layer's
  variables. A group's strategies are those whose label every member has; its costs and its
  edges' matrices are the members' sums, so the variable count does not grow with depth.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import fx

from autopar.planner.intra_op import layouts as lay
from autopar.planner.intra_op.layouts import REPLICATED, record_of
from autopar.planner.intra_op.problem import EdgeCost, ShardingProblem
from autopar.planner.intra_op.strategies import CostContext, Options, decision_options


@dataclass(frozen=True, kw_only=True)
class GraphMapping:
    """How the ILP's groups map back to nodes: ``members[g]`` lists ``(node, kind, strategy
    of that node for each of the group's strategies)``; ``followers`` pairs each merged op
    with the anchor it follows; ``tied`` pairs each tied node with its group's representative."""

    members: tuple[tuple[tuple[str, str, tuple[str, ...]], ...], ...]
    followers: tuple[tuple[str, str], ...]
    tied: tuple[tuple[str, str], ...]


@dataclass
class _Anchor:
    index: int
    node: fx.Node
    options: Options | None
    compute: list[float]
    comm: list[float] = field(default_factory=list)
    reshard: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.comm = self.comm or [0.0] * len(self.compute)
        self.reshard = [0.0] * len(self.compute)


class _Walk:
    """One pass over the graph in order, building anchors, layouts per anchor strategy and edges."""

    def __init__(self, gm: fx.GraphModule, ctx: CostContext) -> None:
        self.gm, self.ctx = gm, ctx
        self.anchors: list[_Anchor] = []
        self.source: dict[fx.Node, tuple[_Anchor, tuple[int, ...]]] = {}
        self.pairs: dict[tuple[int, int], list[list[float]]] = {}
        self.followers: dict[str, str] = {}
        for node in gm.graph.nodes:
            self._visit(node, lay.classify(gm, node))

    def _anchor(self, node: fx.Node, options: Options | None, compute: Sequence[float]) -> _Anchor:
        comm = list(options.communication_s) if options else []
        anchor = _Anchor(index=len(self.anchors), node=node, options=options, compute=list(compute),
                         comm=comm)
        self.anchors.append(anchor)
        return anchor

    def _visit(self, node: fx.Node, kind: str) -> None:
        if kind == "skip":
            return
        inputs = [a for a in node.all_input_nodes if a in self.source]
        if kind in ("linear", "embedding", "attention"):
            options = decision_options(self.gm, node, kind, self.ctx)
            anchor = self._anchor(node, options, options.compute_s)
            for i, producer in enumerate(options.inputs):
                if producer in self.source:
                    self._edge(producer, anchor, [layouts[i] for layouts in options.in_layouts])
            self.source[node] = (anchor, options.out_layout)
        elif kind == "follow" and inputs:
            self._follow(node, inputs)
        else:  # sources, fixed ops, the output: replicated
            cost = self.ctx.elementwise_s(node, sharded=False) if kind in ("fixed", "follow") else 0.0
            anchor = self._anchor(node, None, [cost])
            for producer in inputs:
                self._edge(producer, anchor, [REPLICATED])
            if kind != "output":
                self.source[node] = (anchor, (REPLICATED,))

    def _follow(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        leader = max(inputs, key=lay.numel)
        anchor, layouts = self.source[leader]
        out = []
        for s, layout in enumerate(layouts):
            kept = lay.follow_layout(self.gm, node, leader, layout, self.ctx.tp)
            if kept is None:  # the op cannot keep the split: gather its input, run replicated
                anchor.reshard[s] += self.ctx.convert_s(layout, REPLICATED, self.ctx.tensor_bytes(leader),
                                                        floating=lay.is_floating(leader))
                kept = REPLICATED
            anchor.compute[s] += self.ctx.elementwise_s(node, sharded=kept != REPLICATED)
            out.append(kept)
        for other in inputs:
            if other is not leader:
                self._edge(other, anchor, [lay.operand_layout(other, node, layout) for layout in out])
        self.followers[node.name] = anchor.node.name
        self.source[node] = (anchor, tuple(out))

    def _edge(self, producer: fx.Node, consumer: _Anchor, required: list[int]) -> None:
        """Resharding from ``producer``'s layout (per its anchor's strategy) to ``required``
        (per the consumer's strategy)."""
        anchor, layouts = self.source[producer]
        size, floating = self.ctx.tensor_bytes(producer), lay.is_floating(producer)
        convert = self.ctx.convert_s
        cost = [[convert(src, dst, size, floating=floating) for dst in required] for src in layouts]
        if anchor is consumer:
            for s in range(len(layouts)):
                anchor.reshard[s] += cost[s][s]
        elif len(layouts) == 1:
            for s, value in enumerate(cost[0]):
                consumer.reshard[s] += value
        elif len(required) == 1:
            for s, row in enumerate(cost):
                anchor.reshard[s] += row[0]
        else:
            total = self.pairs.setdefault((anchor.index, consumer.index), [[0.0] * len(required)
                                                                          for _ in layouts])
            for s, row in enumerate(cost):
                total[s] = [a + b for a, b in zip(total[s], row, strict=True)]


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        self.parent[max(ra, rb)] = min(ra, rb)


def _block_prefixes(gm: fx.GraphModule) -> dict[int, str]:
    """Layer index → the module path all of its nodes share (``"blocks.3."``)."""
    paths: dict[int, list[list[str]]] = defaultdict(list)
    for node in gm.graph.nodes:
        record = record_of(node)
        if record is not None and record.layer is not None and record.module_path:
            paths[record.layer].append(record.module_path.split("."))
    prefixes = {}
    for layer, parts in paths.items():
        common = os.path.commonprefix(parts)
        prefixes[layer] = ".".join(common) + "." if common else ""
    return prefixes


def _layer_signature(gm: fx.GraphModule, anchors: list[_Anchor], prefix: str) -> tuple:
    def one(a: _Anchor) -> tuple:
        record = record_of(a.node)
        assert record is not None and a.options is not None
        return (record.module_path.removeprefix(prefix), a.options.kind, lay.op_name(gm, a.node),
                a.options.strategies, a.options.labels, record.shapes,
                tuple(lay.shape(i) for i in a.options.inputs))
    return tuple(one(a) for a in anchors)


def _tie(gm: fx.GraphModule, walk: _Walk, *, tie_layers: bool) -> list[list[int]]:
    """Decision anchors grouped: shared weights always, isomorphic repeated layers if asked."""
    decisions = [a for a in walk.anchors if a.options is not None]
    union = _UnionFind(len(walk.anchors))
    owner: dict[int, int] = {}
    for a in decisions:
        for param_id, _, _ in a.options.params:  # type: ignore[union-attr]
            union.union(owner.setdefault(param_id, a.index), a.index)
    if tie_layers:
        by_layer: dict[int, list[_Anchor]] = defaultdict(list)
        for a in decisions:
            layer = record_of(a.node).layer  # type: ignore[union-attr]
            if layer is not None:
                by_layer[layer].append(a)
        prefixes = _block_prefixes(gm)
        first: dict[tuple, list[_Anchor]] = {}
        for layer in sorted(by_layer):
            members = by_layer[layer]
            reference = first.setdefault(_layer_signature(gm, members, prefixes.get(layer, "")), members)
            for a, b in zip(reference, members, strict=True):
                union.union(a.index, b.index)
    groups: dict[int, list[int]] = defaultdict(list)
    for a in decisions:
        groups[union.find(a.index)].append(a.index)
    return [groups[root] for root in sorted(groups)]


def _memory(gm: fx.GraphModule, walk: _Walk, ctx: CostContext) -> tuple[dict[int, list[float]], float]:
    """Model-state bytes per device of each decision anchor's weights under each strategy (a
    shared weight counted once, at its first user), and of every other parameter."""
    owned: set[int] = set()
    per_anchor: dict[int, list[float]] = {}
    for a in walk.anchors:
        if a.options is None:
            continue
        memory = [0.0] * len(a.options.strategies)
        for param_id, count, split in a.options.params:
            if param_id not in owned:
                owned.add(param_id)
                for s, is_split in enumerate(split):
                    memory[s] += count * ctx.state_bytes_per_param / (ctx.tp if is_split else 1)
        per_anchor[a.index] = memory
    rest = sum(p.numel() for p in gm.parameters() if id(p) not in owned)
    return per_anchor, rest * ctx.state_bytes_per_param


def _edges(walk: _Walk, group_of: dict[int, int], maps: dict[int, list[int]], sizes: list[int],
           reshard: list[list[float]]) -> tuple[EdgeCost, ...]:
    """Sum the anchors' edge matrices per group pair (u < v); within one group, the diagonal."""
    matrices: dict[tuple[int, int], list[list[float]]] = {}
    for (ia, ib), cost in walk.pairs.items():
        ga, gb, ma, mb = group_of[ia], group_of[ib], maps[ia], maps[ib]
        if ga == gb:
            for c in range(sizes[ga]):
                reshard[ga][c] += cost[ma[c]][mb[c]]
            continue
        u, v = min(ga, gb), max(ga, gb)
        total = matrices.setdefault((u, v), [[0.0] * sizes[v] for _ in range(sizes[u])])
        for ci in range(sizes[ga]):
            for cj in range(sizes[gb]):
                if ga == u:
                    total[ci][cj] += cost[ma[ci]][mb[cj]]
                else:
                    total[cj][ci] += cost[ma[ci]][mb[cj]]
    return tuple(EdgeCost(u=u, v=v, cost_s=tuple(map(tuple, m))) for (u, v), m in sorted(matrices.items()))


def build_problem(gm: fx.GraphModule, ctx: CostContext, *, memory_budget_bytes: float | None = None,
                  tie_layers: bool = True) -> tuple[ShardingProblem, GraphMapping]:
    """The ILP's arrays for ``gm`` (every node annotated by ``autopar.capture``) on ``ctx``."""
    walk = _Walk(gm, ctx)
    groups = _tie(gm, walk, tie_layers=tie_layers)
    anchors = walk.anchors
    group_of: dict[int, int] = {}
    maps: dict[int, list[int]] = {}
    labels: list[list[str]] = []
    for g, members in enumerate(groups):
        options = [anchors[m].options for m in members]
        common = [x for x in options[0].labels if all(x in o.labels for o in options)]  # type: ignore[union-attr]
        labels.append(common)
        for m, o in zip(members, options, strict=True):
            group_of[m], maps[m] = g, [o.labels.index(x) for x in common]  # type: ignore[union-attr]
    memory, constant_memory = _memory(gm, walk, ctx)

    def summed(values: dict[int, list[float]] | str) -> list[list[float]]:
        table = values if isinstance(values, dict) else {a.index: getattr(a, values) for a in anchors}
        return [[sum(table[m][maps[m][c]] for m in members) for c in range(len(labels[g]))]
                for g, members in enumerate(groups)]

    reshard = summed("reshard")
    edges = _edges(walk, group_of, maps, [len(x) for x in labels], reshard)
    fixed = [a for a in anchors if a.options is None]
    problem = ShardingProblem(
        names=tuple(anchors[m[0]].node.name for m in groups),
        strategies=tuple(tuple(anchors[m[0]].options.strategies[i] for i in maps[m[0]])  # type: ignore[union-attr]
                         for m in groups),
        compute_s=_rows(summed("compute")), communication_s=_rows(summed("comm")),
        resharding_s=_rows(reshard),
        memory_bytes=_rows(summed(memory)), edges=edges,
        constant_compute_s=sum(a.compute[0] for a in fixed), constant_communication_s=0.0,
        constant_resharding_s=sum(a.reshard[0] for a in fixed), constant_memory_bytes=constant_memory,
        memory_budget_bytes=memory_budget_bytes)
    return problem, _mapping(walk, groups, maps)


def _rows(table: list[list[float]]) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(row) for row in table)


def _mapping(walk: _Walk, groups: list[list[int]], maps: dict[int, list[int]]) -> GraphMapping:
    anchors = walk.anchors
    members = tuple(tuple((anchors[m].node.name, anchors[m].options.kind,  # type: ignore[union-attr]
                           tuple(anchors[m].options.strategies[i] for i in maps[m]))  # type: ignore[union-attr]
                          for m in group) for group in groups)
    tied = tuple((anchors[m].node.name, anchors[group[0]].node.name) for group in groups for m in group[1:])
    return GraphMapping(members=members, followers=tuple(walk.followers.items()), tied=tied)

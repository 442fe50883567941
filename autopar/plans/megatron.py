"""Megatron-LM's tensor-parallel layout as a rule, for plans without a search.

Data flow: captured graph → :func:`megatron_shardings` → ``Plan.shardings`` (one
``Sharding(node, "colwise" | "rowwise")`` per linear layer inside a repeated block)
→ the runtime's tensor-parallel mechanism. The rule is Megatron's alternation
(Shoeybi et al. 2019): a linear whose input is replicated is split by output
columns; a linear that consumes a column-split activation (through elementwise
ops, views and attention) is split by input rows, and its output is summed across
the tensor-parallel group. Pinned plans (``fix={"tp": 2}``) use it; the planner
(a later issue) chooses shardings by cost instead.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from autopar.capture.record import META_KEY
from autopar.plans.schema import Sharding

_LINEAR_FUNCTIONS = {torch.ops.aten.linear.default, torch.ops.aten.addmm.default,
                     torch.ops.aten.mm.default, torch.nn.functional.linear}


def linear_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The 2-D weight parameter a linear-like node multiplies by, or None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return module.weight if isinstance(module, nn.Linear) else None
    if node.op != "call_function" or node.target not in _LINEAR_FUNCTIONS:
        return None
    position = 2 if node.target is torch.ops.aten.addmm.default else 1
    if len(node.args) <= position or not isinstance(node.args[position], fx.Node):
        return None
    attr = node.args[position]
    if attr.op != "get_attr":
        return None
    value = gm.get_parameter(str(attr.target)) if isinstance(attr.target, str) else None
    return value if value is not None and value.dim() == 2 else None


def _activation_input(node: fx.Node) -> fx.Node | None:
    if node.op == "call_module":
        return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    position = 1 if node.target is torch.ops.aten.addmm.default else 0
    arg = node.args[position] if len(node.args) > position else None
    return arg if isinstance(arg, fx.Node) else None


def embedding_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The table an embedding lookup reads, or None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return module.weight if isinstance(module, nn.Embedding) else None
    if node.op == "call_function" and node.target in (torch.ops.aten.embedding.default,
                                                       torch.nn.functional.embedding):
        position = 0 if node.target is torch.ops.aten.embedding.default else 1
        attr = node.args[position]
        if isinstance(attr, fx.Node) and attr.op == "get_attr":
            return gm.get_parameter(str(attr.target))
    return None


def _vocabulary(gm: fx.GraphModule, tp: int) -> tuple[list[Sharding], int | None]:
    """Megatron's vocabulary-parallel token embedding: the largest embedding table,
    split by rows (tokens) when ``tp`` divides the vocabulary."""
    tables = [(node, w) for node in gm.graph.nodes if (w := embedding_weight(gm, node)) is not None]
    if not tables:
        return [], None
    node, weight = max(tables, key=lambda item: item[1].shape[0])
    if weight.shape[0] % tp:
        return [], None
    return [Sharding(node=node.name, strategy="vocab")], id(weight)


def megatron_shardings(gm: fx.GraphModule, tp: int, *, vocab_parallel: bool = True) -> tuple[Sharding, ...]:
    """Column/row alternation for every linear in a repeated layer that ``tp`` divides,
    and with ``vocab_parallel`` the token embedding split by vocabulary rows plus an LM
    head tied to it split by columns. (With pipeline stages the embedding and a tied
    head live on different ranks; their vocabulary split is not supported there yet,
    so pinned plans pass ``vocab_parallel=False`` when pp > 1.)"""
    if tp == 1:
        return ()
    split: dict[fx.Node, bool] = {}
    choices, vocab_table = _vocabulary(gm, tp) if vocab_parallel else ([], None)
    for node in gm.graph.nodes:
        weight = linear_weight(gm, node)
        record = node.meta.get(META_KEY)
        out_first = node.op == "call_module" or node.target in (torch.ops.aten.linear.default,
                                                                 torch.nn.functional.linear)
        if weight is not None and id(weight) == vocab_table and out_first:
            choices.append(Sharding(node=node.name, strategy="colwise"))  # tied LM head
            split[node] = False  # the stage hands on whole logits
            continue
        source = _activation_input(node) if weight is not None else None
        if weight is not None and record is not None and record.layer is not None and source is not None:
            divisible = all(size % tp == 0 for size in weight.shape)
            if split.get(source, False) and divisible:
                choices.append(Sharding(node=node.name, strategy="rowwise"))
                split[node] = False
                continue
            if not split.get(source, False) and divisible:
                choices.append(Sharding(node=node.name, strategy="colwise"))
                split[node] = True
                continue
        split[node] = any(split.get(a, False) for a in node.all_input_nodes)
    return tuple(choices)

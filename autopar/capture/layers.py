"""Repeated-block detection: which transformer layer each node belongs to.

Capture builds a :class:`LayerIndex` from the user's model and the captured graph,
before annotation. A *stack* is an ``nn.ModuleList``/``nn.Sequential`` with at
least two children of one class that hold parameters (GPT-2's ``transformer.h``,
BERT's ``encoder.layer``, T5's ``encoder.block`` and ``decoder.block``); stacks
nested inside a block of another stack (Mixtral's experts) are not layers. Blocks
are numbered over all stacks in the order the graph first touches them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container
from dataclasses import dataclass

from torch import fx, nn


@dataclass(frozen=True, kw_only=True)
class LayerInfo:
    """One repeated block of the model, as found by capture."""

    name: str
    index: int
    stack: str
    param_count: int
    flops_fwd: int
    flops_bwd: int


def find_stacks(model: nn.Module) -> dict[str, list[str]]:
    """Container path → paths of its repeated children, outermost stacks only."""
    stacks: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = [(name, child) for name, child in module.named_children()
                    if any(True for _ in child.parameters())]
        counts = Counter(type(child) for _, child in children)
        repeated = [f"{path}.{name}" if path else name
                    for name, child in children if counts[type(child)] >= 2]
        if repeated:
            stacks[path] = repeated
    blocks = {block for members in stacks.values() for block in members}
    return {
        path: members for path, members in stacks.items()
        if not any(path.startswith(block + ".") for block in blocks)
    }


def node_module_path(node: fx.Node) -> str:
    """The path of the innermost module a node comes from ("" at the top level)."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path if isinstance(path, str) else ""
    return ""


class LayerIndex:
    """Maps module paths to layer indices, numbering blocks in execution order."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.stacks = find_stacks(model)
        block_stack = {b: s for s, members in self.stacks.items() for b in members}
        first_seen: dict[str, int] = {}
        for position, node in enumerate(gm.graph.nodes):
            block = self._block_of(node_module_path(node), block_stack)
            if block is not None and block not in first_seen:
                first_seen[block] = position
        ordered = sorted(first_seen, key=first_seen.__getitem__)
        self.blocks: tuple[str, ...] = tuple(ordered)
        self.block_stack = block_stack
        self._index = {block: i for i, block in enumerate(ordered)}

    @staticmethod
    def _block_of(path: str, blocks: Container[str]) -> str | None:
        parts = path.split(".") if path else []
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in blocks:
                return prefix
        return None

    def module_path(self, node: fx.Node) -> str:
        return node_module_path(node)

    def layer_of(self, path: str) -> int | None:
        block = self._block_of(path, self._index)
        return None if block is None else self._index[block]

"""This rank's part of a step's batch: from the whole global batch, or from the rank's own shard.

Data flow: ``Compiled.step(inputs, targets)`` (every rank passes the GLOBAL batch of the plan,
``global_batch_size`` rows) or ``Compiled.step(inputs, targets, local=True)`` (every rank passes
its OWN rows: ``global_batch_size / dp`` rows, the whole sequence; ``autopar.data.TokenLoader``
reads exactly these) → the Engine's :class:`BatchLayout` → :meth:`BatchLayout.split` checks the
shapes against the plan, takes this rank's data-parallel rows of a global batch, cuts the
context-parallel sequence chunk (the Engine's ``cut``), and counts the global batch's counted
target tokens (one all-reduce over the dp group when the rows are local) → :class:`RankBatch` →
the pipeline schedule (training step or ``autopar.runtime.evaluate``).

Pipeline ranks that run neither the first nor the last stage need no data and may pass ``None``
for inputs and targets; the first stage needs the inputs, the last the targets. A batch of
``global / dp`` rows passed as global (or the global batch passed with ``local=True``) is refused
with both sizes and the fix, instead of being sliced again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from autopar.losses import IGNORE_INDEX


@dataclass(frozen=True)
class RankBatch:
    """What this rank feeds its stages: first-stage inputs and last-stage targets (on the device;
    empty or None on other stages), the global batch's counted target tokens (exact loss; 0 when not
    counted) and where this rank's rows start in the global batch."""

    inputs: list[Any]
    target: Any
    counted: int
    first_sample: int


@dataclass(frozen=True, kw_only=True)
class BatchLayout:
    """How a global batch maps onto this rank (built once by the Engine from its Plan and Layout)."""

    global_batch_size: int
    dp: int
    dp_rank: int
    example_shapes: list[tuple[int, ...]]  # global shape of each tensor input, () for non-tensors
    cut: Callable[[Any], Any]  # this cp rank's sequence chunk of a tensor
    device: torch.device
    has_first: bool
    has_last: bool
    dp_group: Any = None

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.dp

    def split(self, tensors: list[Any] | None, targets: Any, *, local: bool, count_tokens: bool) -> RankBatch:
        """This rank's :class:`RankBatch`; ``tensors`` are the graph's tensor inputs (None: not given)."""
        self._check_given(tensors, targets)
        if tensors is not None:
            for got, example in zip(tensors, self.example_shapes, strict=True):
                if isinstance(got, torch.Tensor) and example:
                    self._check_rows("an input", tuple(got.shape), example, local=local)
        if isinstance(targets, torch.Tensor):
            self._check_rows("targets", tuple(targets.shape), (), local=local)
        rows = (lambda v: v) if local else self._rows
        inputs = [_to(self.cut(rows(v)), self.device) for v in tensors] if self.has_first and tensors else []
        target = _to(self.cut(rows(targets)), self.device) if self.has_last else None
        counted = self._counted(targets, local=local) if count_tokens else 0
        return RankBatch(inputs, target, counted, self.dp_rank * self.local_batch_size)

    def _check_given(self, tensors: list[Any] | None, targets: Any) -> None:
        if tensors is None and self.has_first:
            raise ValueError("step() got inputs=None on a rank that runs the first pipeline stage: it needs "
                             "the inputs (only ranks of later stages may pass None)")
        if targets is None and self.has_last:
            raise ValueError("step() got targets=None on a rank that runs the last pipeline stage: it needs "
                             "the targets (only ranks of earlier stages may pass None)")

    def _check_rows(self, what: str, got: tuple[int, ...], example: tuple[int, ...], *, local: bool) -> None:
        """``got`` must be the plan's global batch (``local`` False) or one dp rank's rows (True)."""
        batch, share = self.global_batch_size, self.local_batch_size
        rows = got[0] if got else None
        wanted = share if local else batch
        rest_ok = not example or got[1:] == tuple(example[1:])
        if rows == wanted and rest_ok:
            return
        if self.dp > 1 and rest_ok and not local and rows == share:
            raise ValueError(
                f"step() got {what} with {rows} rows, but this plan's global batch is {batch} = "
                f"dp({self.dp}) × {share}: {rows} rows is one data-parallel rank's share, which step() "
                f"would slice again; pass compiled.step(inputs, targets, local=True) with each rank's own "
                f"{share} rows, or the whole global batch of {batch} rows on every rank")
        if self.dp > 1 and rest_ok and local and rows == batch:
            raise ValueError(
                f"step(..., local=True) got {what} with {rows} rows, the whole global batch: with local=True "
                f"each rank passes its own {batch} / dp({self.dp}) = {share} rows (autopar.data.TokenLoader "
                f"with dp_degree={self.dp}, dp_rank=… reads them); drop local=True to pass the global batch")
        shape = f"({wanted}, {', '.join(str(d) for d in example[1:])})" if example else f"{wanted} rows"
        kind = f"this rank's share of the plan's global batch of {batch}" if local else \
            "the plan's global batch"
        raise ValueError(f"step() got {what} of shape {got}, but this engine runs {kind}: expected {shape} "
                         "(the shapes it was planned and captured for); pad or cut batches to that shape, or "
                         "compile the model again for the new one")

    def _rows(self, value: Any) -> Any:
        """This rank's data-parallel rows of a global-batch tensor."""
        if not isinstance(value, torch.Tensor) or self.dp == 1:
            return value
        return value.chunk(self.dp)[self.dp_rank]

    def _counted(self, targets: Any, *, local: bool) -> int:
        """Counted target tokens in the whole global batch (at least 1); only the last stage's ranks
        need it, and with local rows they add their counts over the dp group."""
        if not self.has_last or not isinstance(targets, torch.Tensor):
            return 1
        count = (targets != IGNORE_INDEX).sum().reshape(1).to(self.device)
        if local and self.dp > 1:
            dist.all_reduce(count, group=self.dp_group)
        return max(int(count.item()), 1)


def given(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a step got inputs (``Compiled.step(None, ...)`` hands an empty call on)."""
    return bool(args) or bool(kwargs)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value

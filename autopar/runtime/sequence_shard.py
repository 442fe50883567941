"""Which tensors of a batch are sequences, and this cp rank's part of them (context parallelism).

Data flow: the Plan's ``seq_len`` and ``parallelism.cp`` + the Layout's ``cp_rank`` →
:class:`SequenceShard` → the engine cuts each step's inputs and targets after the data-parallel
split (:meth:`SequenceShard.shard`: the load-balanced chunks ``r`` and ``2·cp−1−r`` of
``autopar.runtime.context_parallel``, Llama 3 §3.3.2), and ``autopar.launch_plan`` captures the
stage graphs at the local length (:func:`local_example`) so every static shape in them
(``view``/``reshape`` sizes in a ``torch.export`` graph) is already ``seq/cp``. A tensor is a
sequence when its second dimension is the plan's sequence length (token ids, position ids,
targets): the same rule as ``autopar.capture.batch.leading_dims``, which defines ``seq_len``.

Refusals with cp > 1 live here too: random-LTD (:func:`check_passes`) drops tokens per sample
inside each layer, from one index set over the whole sequence; its gather would need the other
cp ranks' tokens, so the combination is refused by name rather than silently changing which
tokens are kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map

from autopar.plans import Plan
from autopar.runtime.context_parallel import check_sequence_divisible, shard_sequence

SEQUENCE_DIM = 1  # (batch, seq, …): the layout leading_dims reads


@dataclass(frozen=True)
class SequenceShard:
    """This rank's cut of sequence tensors: ``cp`` ranks, this one ``rank``, full length ``seq_len``."""

    seq_len: int | None
    cp: int
    rank: int

    @classmethod
    def of(cls, plan: Plan, cp_rank: int) -> SequenceShard:
        cp = plan.parallelism.cp
        if cp > 1:
            if plan.seq_len is None:
                raise ValueError(f"the plan has context parallelism (cp = {cp}) but no sequence length "
                                 "(its batch has no (batch, seq) tensor); use cp = 1 for this model")
            check_sequence_divisible(plan.seq_len, cp=cp)
        return cls(plan.seq_len, cp, cp_rank)

    def is_sequence(self, value: Any) -> bool:
        return (isinstance(value, torch.Tensor) and value.dim() > SEQUENCE_DIM
                and value.shape[SEQUENCE_DIM] == self.seq_len)

    def shard(self, value: Any) -> Any:
        """This rank's tokens of ``value`` if it is a sequence tensor (a copy), else ``value``."""
        if self.cp == 1 or not self.is_sequence(value):
            return value
        return shard_sequence(value, dim=SEQUENCE_DIM, cp=self.cp, rank=self.rank)

    def global_shape(self, local: tuple[int, ...]) -> tuple[int, ...]:
        """The full-batch shape of an input captured at the local length."""
        if self.cp == 1 or len(local) <= SEQUENCE_DIM or local[SEQUENCE_DIM] * self.cp != self.seq_len:
            return local
        return (*local[:SEQUENCE_DIM], self.seq_len, *local[SEQUENCE_DIM + 1:])

    @property
    def local_len(self) -> int | None:
        return None if self.seq_len is None else self.seq_len // self.cp


def local_example(values: Any, *, seq_len: int, cp: int) -> Any:
    """``values`` with every sequence tensor cut to its first ``seq_len / cp`` tokens: an example
    of the shapes one cp rank runs (which tokens does not matter to a capture)."""
    check_sequence_divisible(seq_len, cp=cp)

    full = SequenceShard(seq_len, cp, 0)
    return tree_map(lambda v: v.narrow(SEQUENCE_DIM, 0, seq_len // cp) if full.is_sequence(v) else v, values)


def check_passes(applied: Iterable[str], *, cp: int) -> None:
    """Refuse graph passes that cannot run with the sequence split over cp ranks."""
    if cp > 1 and "random_ltd" in set(applied):
        raise ValueError(f"random-LTD (passes=[RandomLTD(...)]) cannot run with context parallelism "
                         f"(cp = {cp}): it keeps a per-sample subset of the whole sequence's tokens inside "
                         "each layer, but each cp rank holds only its own chunks of the sequence; drop "
                         "the RandomLTD pass or use cp = 1")

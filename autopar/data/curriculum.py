"""Curriculum learning (DeepSpeed Data Efficiency): difficulty metrics, an offline difficulty
index, pacing functions, and a sampler that feeds easy samples first.

Data flow: dataset → a metric per sample → :class:`DifficultyIndex` (computed once, saved as
JSON or a weights-only ``.pt``) → :class:`CurriculumSampler` (``pacing(step)`` sets which
samples a step may draw) → ``torch.utils.data.DataLoader``. The sequence-length metric by
truncation needs no index: :func:`truncate_batch` cuts every batch to ``pacing(step)`` tokens.
Off by default (nothing here runs unless built): studies found curricula alone rarely beat
random sampling, so measure with :meth:`CurriculumSampler.pool_size` and a baseline run.

Pacing (DeepSpeed's ``fixed_linear`` / ``fixed_root`` / ``fixed_discrete``), progress
``p = min(1, step / num_steps)``::

    linear:   d = min_value + (max_value − min_value) p
    root:     d = min_value + (max_value − min_value) p^(1/root_degree)
    discrete: d = values[i] for the first i with step ≤ boundaries[i], else values[-1]

``d`` is rounded down to a multiple of ``granularity`` and kept in [min_value, max_value].
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils._pytree import tree_map
from torch.utils.data import Sampler

SCHEMA_VERSION = 1
PacingKind = Literal["linear", "root", "discrete", "custom"]
DifficultyType = Literal["value", "percentile"]


def _tokens(sample: Any, key: str | None = None) -> torch.Tensor:
    if isinstance(sample, dict):
        sample = sample[key or "input_ids"]
    elif isinstance(sample, tuple):
        sample = sample[0]
    tokens = torch.as_tensor(sample)
    if tokens.dim() != 1:
        raise ValueError(f"a sample's tokens must be 1-D, got shape {tuple(tokens.shape)}; pass key= for "
                         "dict samples or a metric of your own")
    return tokens


def sequence_length(sample: Any, *, pad_id: int | None = None, key: str | None = None) -> float:
    """Tokens in ``sample`` (a 1-D sequence, a tuple whose first item is one, or a dict), pads excluded."""
    tokens = _tokens(sample, key)
    return float(tokens.numel() if pad_id is None else int((tokens != pad_id).sum()))


def token_counts(samples: Any, *, vocab_size: int, key: str | None = None) -> torch.Tensor:
    """How often each token id occurs over ``samples`` (int64, shape ``(vocab_size,)``)."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for sample in samples:
        counts += torch.bincount(_tokens(sample, key).long().flatten(), minlength=vocab_size)[:vocab_size]
    return counts


def vocabulary_rarity(counts: torch.Tensor, *, reduction: Literal["sum", "mean"] = "sum",
                      key: str | None = None) -> Callable[[Any], float]:
    """The metric ``−Σ log p(token)`` over a sample (``reduction="mean"`` divides by its length), with
    ``p`` from ``counts`` (add-one smoothed): rare words make a sample harder."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction = {reduction!r} is invalid: expected 'sum' or 'mean'")
    counts = torch.as_tensor(counts, dtype=torch.float64)
    neg_log_p = -torch.log((counts + 1) / (counts.sum() + counts.numel()))

    def rarity(sample: Any) -> float:
        values = neg_log_p[_tokens(sample, key).long()]
        return float(values.sum() if reduction == "sum" else values.mean())

    rarity.__name__ = f"vocabulary_rarity_{reduction}"
    return rarity


@dataclass(frozen=True)
class DifficultyIndex:
    """Per-sample difficulty of a dataset, computed once (``build``) and stored (``save``/``load``)."""

    difficulties: torch.Tensor
    metric: str

    def __post_init__(self) -> None:
        values = torch.as_tensor(self.difficulties, dtype=torch.float64).flatten()
        if values.numel() == 0 or not torch.isfinite(values).all():
            raise ValueError("a difficulty index needs one finite difficulty per sample")
        object.__setattr__(self, "difficulties", values)

    def __len__(self) -> int:
        return self.difficulties.numel()

    @classmethod
    def build(cls, dataset: Any, metric: Callable[[Any], float] | str, *,
              name: str | None = None) -> DifficultyIndex:
        """Apply ``metric`` (a callable, or ``"sequence_length"``) to every ``dataset[i]``."""
        if metric == "sequence_length":
            metric = sequence_length
        if not callable(metric):
            raise ValueError(f"metric = {metric!r} is invalid: expected 'sequence_length' or a callable "
                             "sample -> float (e.g. vocabulary_rarity(token_counts(data, vocab_size=V)))")
        values = [float(metric(dataset[i])) for i in range(len(dataset))]
        return cls(torch.tensor(values, dtype=torch.float64), name or getattr(metric, "__name__", "custom"))

    def save(self, path: str | Path) -> None:
        """``.json`` (readable) or ``.pt`` (a plain dict of tensors and strings; loaded weights-only)."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "metric": self.metric,
                                        "difficulties": self.difficulties.tolist()}))
        elif path.suffix == ".pt":
            torch.save({"schema_version": SCHEMA_VERSION, "metric": self.metric,
                        "difficulties": self.difficulties}, path)
        else:
            raise ValueError(f"cannot save a difficulty index to {str(path)!r}: use a .json or .pt file name")

    @classmethod
    def load(cls, path: str | Path) -> DifficultyIndex:
        path = Path(path)
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        elif path.suffix == ".pt":
            data = torch.load(path, weights_only=True)
        else:
            raise ValueError(f"cannot load a difficulty index from {str(path)!r}: expected a .json or .pt "
                             "file")
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{str(path)!r} is not a difficulty index of schema version {SCHEMA_VERSION}")
        return cls(torch.as_tensor(data["difficulties"], dtype=torch.float64), str(data["metric"]))


@dataclass(frozen=True, kw_only=True)
class Pacing:
    """The difficulty threshold at a step (see the module docstring for the formulas)."""

    kind: PacingKind = "linear"
    min_value: float = 0.0
    max_value: float = 100.0
    num_steps: int = 1
    root_degree: float = 2.0
    granularity: float = 1.0
    values: tuple[float, ...] = ()
    boundaries: tuple[int, ...] = ()
    function: Callable[[int], float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "root", "discrete", "custom"):
            raise ValueError(f"Pacing.kind = {self.kind!r} is invalid: expected 'linear', 'root', 'discrete' "
                             "or 'custom'")
        if self.kind == "custom" and not callable(self.function):
            raise ValueError("Pacing.function must be a callable step -> difficulty when kind='custom'")
        if self.kind == "discrete" and (not self.values or len(self.values) != len(self.boundaries) + 1
                                        or list(self.boundaries) != sorted(self.boundaries)):
            raise ValueError(f"Pacing(kind='discrete') needs len(values) = len(boundaries) + 1 and sorted "
                             f"boundaries, got values={self.values!r}, boundaries={self.boundaries!r}")
        if self.kind in ("linear", "root"):
            if type(self.num_steps) is not int or self.num_steps < 1:
                raise ValueError(f"Pacing.num_steps = {self.num_steps!r} is invalid: expected an int >= 1")
            if not self.min_value <= self.max_value:
                raise ValueError(f"Pacing.min_value = {self.min_value} exceeds max_value = {self.max_value}")
            if self.root_degree <= 0 or self.granularity < 0:
                raise ValueError("Pacing.root_degree must be > 0 and Pacing.granularity >= 0")

    def __call__(self, step: int) -> float:
        if self.kind == "custom":
            return float(self.function(step))  # type: ignore[misc]
        if self.kind == "discrete":
            pairs = zip(self.values, self.boundaries, strict=False)
            return float(next((value for value, end in pairs if step <= end), self.values[-1]))
        progress = min(1.0, max(step, 0) / self.num_steps)
        if self.kind == "root":
            progress = progress ** (1.0 / self.root_degree)
        value = self.min_value + (self.max_value - self.min_value) * progress
        if self.granularity > 0:
            value = math.floor(value / self.granularity + 1e-9) * self.granularity
        return min(max(value, self.min_value), self.max_value)


class CurriculumSampler(Sampler[int]):
    """Sample indices for ``num_steps`` batches of ``batch_size``, easy samples first.

    At step t the pool is the samples whose difficulty is ≤ ``pacing(t)`` (``"value"``) or the
    easiest ``pacing(t)`` percent (``"percentile"``), never fewer than ``batch_size``; the batch
    is drawn uniformly without replacement from the pool with a generator seeded by
    (``seed``, t), so a run is deterministic and resumes exactly from ``state_dict()``. Use with
    ``DataLoader(dataset, batch_size=batch_size, sampler=sampler)``.
    """

    def __init__(self, index: DifficultyIndex | Sequence[float] | torch.Tensor,
                 pacing: Pacing | Callable[[int], float], *, batch_size: int, num_steps: int, seed: int = 0,
                 difficulty_type: DifficultyType = "percentile") -> None:
        if not isinstance(index, DifficultyIndex):
            index = DifficultyIndex(torch.as_tensor(index, dtype=torch.float64), "custom")
        for name, value in (("batch_size", batch_size), ("num_steps", num_steps)):
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} = {value!r} is invalid: expected an int >= 1")
        if batch_size > len(index):
            raise ValueError(f"batch_size = {batch_size} exceeds the {len(index)} samples in the index")
        if difficulty_type not in ("value", "percentile"):
            raise ValueError(f"difficulty_type = {difficulty_type!r} is invalid: expected 'value' or "
                             "'percentile'")
        self.index, self.pacing, self.batch_size, self.num_steps = index, pacing, batch_size, num_steps
        self.seed, self.difficulty_type, self.step = seed, difficulty_type, 0
        self._order = torch.sort(index.difficulties, stable=True).indices  # easiest first

    def threshold(self, step: int) -> float:
        return float(self.pacing(step))

    def pool_size(self, step: int) -> int:
        """How many samples step ``step`` may draw from (the easiest ones)."""
        n, threshold = len(self.index), self.threshold(step)
        if self.difficulty_type == "percentile":
            size = math.ceil(n * min(max(threshold, 0.0), 100.0) / 100.0)
        else:
            size = int((self.index.difficulties <= threshold).sum())
        return max(size, self.batch_size)

    def batch(self, step: int) -> list[int]:
        """The sample indices of step ``step``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        pool = self._order[: self.pool_size(step)]
        return pool[torch.randperm(pool.numel(), generator=generator)[: self.batch_size]].tolist()

    def __iter__(self) -> Iterator[int]:
        while self.step < self.num_steps:
            indices = self.batch(self.step)
            self.step += 1
            yield from indices

    def __len__(self) -> int:
        return (self.num_steps - self.step) * self.batch_size

    def set_step(self, step: int) -> None:
        if type(step) is not int or not 0 <= step <= self.num_steps:
            raise ValueError(f"step = {step!r} is invalid: expected an int in [0, {self.num_steps}]")
        self.step = step

    def state_dict(self) -> dict[str, int]:
        """The next step to draw. With DataLoader workers the sampler runs ahead of training: save the
        trainer's step instead (``{"step": n}``)."""
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"the checkpoint's curriculum seed {state['seed']} differs from this sampler's "
                             f"{self.seed}: build the sampler with seed={state['seed']}")
        self.set_step(int(state["step"]))


def truncate_batch(batch: Any, length: int, *, dim: int = 1) -> Any:
    """Every tensor in ``batch`` (a tensor, tuple, list or dict) cut to ``length`` along ``dim``:
    the sequence-length curriculum by truncation, with ``length = int(pacing(step))``."""
    if type(length) is not int or length < 1:
        raise ValueError(f"length = {length!r} is invalid: expected an int >= 1 (e.g. int(pacing(step)))")
    return tree_map(lambda t: t.narrow(dim, 0, min(length, t.shape[dim]))
                    if isinstance(t, torch.Tensor) and t.dim() > dim else t, batch)

"""User-pinned plan choices (``fix=``) as a validated, frozen configuration.

``autopar.compile(..., fix={...})`` and ``autopar.plan(..., fix={...})`` turn the
user's dict into a :class:`Fix`; the planner searches only what is not pinned and
the runtime executes it. Unknown keys and bad values fail here, with the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

Schedule = Literal["gpipe", "1f1b", "interleaved", "zero_bubble"]
Recompute = Literal["none", "selective", "full"]

_DEGREES = ("dp", "tp", "pp", "ep", "cp", "microbatch_size", "num_microbatches", "virtual_stages")


@dataclass(frozen=True, kw_only=True)
class Fix:
    """Choices the user pins; None means "let autopar choose"."""

    dp: int | None = None
    """Data-parallel degree: model replicas, each on its own share of the batch."""
    tp: int | None = None
    """Tensor-parallel degree (Megatron's column/row-parallel layout)."""
    pp: int | None = None
    """Pipeline-parallel degree: ranks the layers are split over, in stages."""
    ep: int | None = None
    """Expert-parallel degree: ranks a MoE layer's experts are spread over."""
    cp: int | None = None
    """Context-parallel degree: each rank holds seq / cp tokens of every sample; attention runs as
    a ring."""
    sequence_parallel: bool | None = None
    """Megatron sequence parallelism: the norms and dropout between tensor-parallel regions run on
    seq / tp tokens per rank (needs tp ≥ 2)."""
    microbatch_size: int | None = None
    """Samples in one microbatch."""
    num_microbatches: int | None = None
    """Microbatches a step's batch is split into."""
    schedule: Schedule | None = None
    """Pipeline schedule."""
    virtual_stages: int | None = None
    """Model chunks per pipeline rank (≥ 2 for "interleaved", 1 for "gpipe" and "1f1b")."""
    recompute: Recompute | None = None
    """Activation recomputation in the backward: "selective" recomputes all but the matmuls' outputs,
    "full" every layer from its input."""
    zero: int | None = None
    """ZeRO stage over the data-parallel ranks: 1 shards the optimizer state, 2 also the gradients,
    3 also the parameters (FSDP2)."""

    def __post_init__(self) -> None:
        for name in _DEGREES:
            _check_positive_int(name, getattr(self, name))
        _check_choice("schedule", self.schedule, get_args(Schedule))
        _check_choice("recompute", self.recompute, get_args(Recompute))
        if self.zero is not None and (type(self.zero) is not int or not 0 <= self.zero <= 3):
            raise ValueError(f"fix['zero'] = {self.zero!r} is invalid: expected an int 0, 1, 2 or 3")
        if self.sequence_parallel is not None and not isinstance(self.sequence_parallel, bool):
            raise ValueError(f"fix['sequence_parallel'] = {self.sequence_parallel!r} is invalid: "
                             "expected True or False")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("fix={'sequence_parallel': True, 'tp': 1} is contradictory: sequence "
                             "parallelism splits the tensor-parallel ranks' work; pin tp ≥ 2")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | Fix | None) -> Fix:
        """Validate a user dict; unknown keys raise with the list of valid keys."""
        if values is None:
            return cls()
        if isinstance(values, Fix):
            return values
        if not isinstance(values, Mapping):
            raise TypeError(f"fix must be a dict such as {{'pp': 2, 'tp': 2}}, got {type(values).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid), key=repr)  # keys need not be str, nor comparable
        if unknown:
            raise ValueError(f"fix has unknown key(s) {unknown}; valid keys are {valid}")
        return cls(**dict(values))

    def pinned(self) -> dict[str, Any]:
        """Only the choices that are set, as a plain dict."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def world_size(self) -> int:
        """The device count the pinned degrees imply (unpinned degrees count as 1)."""
        return (self.dp or 1) * (self.tp or 1) * (self.pp or 1) * (self.cp or 1)


def _check_positive_int(name: str, value: Any) -> None:
    if value is not None and (type(value) is not int or value < 1):
        raise ValueError(f"fix['{name}'] = {value!r} is invalid: expected a positive int")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"fix['{name}'] = {value!r} is invalid: expected one of {list(allowed)}")

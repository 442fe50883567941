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
    tp: int | None = None
    pp: int | None = None
    ep: int | None = None
    cp: int | None = None
    sequence_parallel: bool | None = None
    microbatch_size: int | None = None
    num_microbatches: int | None = None
    schedule: Schedule | None = None
    virtual_stages: int | None = None
    recompute: Recompute | None = None
    zero: int | None = None

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

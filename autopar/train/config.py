"""The trainer's configuration: one frozen, keyword-only record, from Python, TOML or flags.

Data flow: ``autopar.train(model=..., corpus=..., ...)`` / ``autopar train --config run.toml
--steps 200`` (the TOML file's keys are the field names below; command-line flags, the same names
with dashes, override it) → :meth:`TrainConfig.from_mapping` (unknown keys refused by name, each
value checked) → the training loop (``autopar.train.loop``). ``fix`` is ``autopar.compile``'s pins
(a TOML table ``[fix]``, or ``--fix dp=2,pp=1``); ``num_microbatches`` is gradient accumulation
(pinned as ``fix["num_microbatches"]``).

The learning rate warms up linearly for ``warmup_steps`` and then follows a cosine from ``lr`` down
to ``lr × min_lr_ratio`` at ``steps`` (constant after the warm-up when only ``time_budget_s`` bounds
the run). ``steps`` is the TOTAL step count: a second run with the same ``out`` and a larger
``steps`` resumes from the latest checkpoint and continues to it.

``passes`` are graph passes for ``autopar.compile(..., passes=...)``: ``autopar.passes`` objects or
their plain form ``{"name": "random_ltd", "min_tokens": 8, "num_steps": 100}`` (a TOML array of
tables ``[[passes]]``, or JSON text from the command line), kept in the plain form so the config
travels as JSON to spawned ranks. ``report`` measures the compiled model after the last step
(``compiled.report`` on the last global batch: time by phase and memory by category, measured
beside predicted) and prints its tables on rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from autopar.config import Fix
from autopar.passes import GraphPass, check_passes
from autopar.runtime.pass_state import PASS_TYPES


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run needs (see the module docstring)."""

    model: str
    corpus: str
    out: str
    nproc: int = 1
    cluster: str | None = None  # default local:<nproc>
    fix: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    time_budget_s: float | None = None
    global_batch_size: int = 8
    seq_len: int = 64
    vocab_size: int = 2048
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    num_microbatches: int | None = None
    bf16: bool = True  # autocast on GPU only
    eval_interval: int = 50
    eval_batches: int = 4
    checkpoint_interval: int = 100
    keep_checkpoints: int = 2
    log_interval: int = 10
    seed: int = 0
    heldout_fraction: float = 0.05
    fim_rate: float = 0.0
    cache_dir: str | None = None  # tokenizer and token files; default ~/.cache/autopar/data
    plan_time_limit_s: float = 60.0
    passes: tuple[dict[str, Any], ...] = ()  # graph passes, plain form (see the module docstring)
    report: bool = False  # after the last step, the measured report's tables on rank 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "passes", pass_items(self.passes))
        for name in ("model", "corpus", "out"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} = {value!r} is invalid: expected a non-empty string")
        _positive_int(self, "nproc", "global_batch_size", "seq_len", "eval_interval", "eval_batches",
                      "checkpoint_interval", "keep_checkpoints", "log_interval")
        _non_negative_int(self, "warmup_steps", "seed")
        if self.steps is None and self.time_budget_s is None:
            raise ValueError("neither steps nor time_budget_s is set: give the run's total steps (--steps N) "
                             "or a time budget in seconds (--time-budget-s S)")
        if self.steps is not None:
            _positive_int(self, "steps")
        for name in ("time_budget_s", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not _positive_number(value):
                raise ValueError(f"{name} = {value!r} is invalid: expected a number > 0, or leave it unset")
        if not _positive_number(self.lr) or not _positive_number(self.plan_time_limit_s):
            raise ValueError(f"lr = {self.lr!r} and plan_time_limit_s = {self.plan_time_limit_s!r} must be "
                             "numbers > 0")
        _fraction(self, "min_lr_ratio", "heldout_fraction", "fim_rate", "weight_decay")
        if len(self.betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas = {self.betas!r} is invalid: expected two numbers in [0, 1), "
                             "e.g. [0.9, 0.95]")
        if self.vocab_size < 260 or type(self.vocab_size) is not int:
            raise ValueError(f"vocab_size = {self.vocab_size!r} is invalid: expected an int >= 260 "
                             "(256 bytes and 4 special tokens)")
        if self.num_microbatches is not None:
            _positive_int(self, "num_microbatches")
        if not isinstance(self.fix, Mapping):
            raise ValueError(f"fix = {self.fix!r} is invalid: expected a table of pins such as {{dp = 2}}")
        Fix.from_dict(self.compile_fix)  # pins named and typed as autopar.compile wants

    @property
    def graph_passes(self) -> list[GraphPass]:
        """``passes`` as ``autopar.passes`` objects, for ``autopar.compile``."""
        return _graph_passes(self.passes)

    @property
    def cluster_spec(self) -> str:
        return self.cluster or f"local:{self.nproc}"

    @property
    def compile_fix(self) -> dict[str, Any]:
        """``fix`` with gradient accumulation pinned (``num_microbatches``)."""
        pins = dict(self.fix)
        if self.num_microbatches is not None:
            pins["num_microbatches"] = self.num_microbatches
        return pins

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "the configuration") -> TrainConfig:
        """A config from plain values (TOML, JSON, flags); an unknown key is refused by name."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {source}; known keys: {', '.join(known)}")
        missing = sorted(name for name in ("model", "corpus", "out") if name not in values)
        if missing:
            raise ValueError(f"{source} does not set {missing}: give --model MODEL, --corpus DIR and "
                             "--out DIR (or those keys in the config file)")
        checked = {name: _coerce(name, value, known[name].type) for name, value in values.items()}
        return cls(**checked)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
        """The config file's keys, then ``overrides`` (command-line flags) on top."""
        try:
            with open(path, "rb") as file:
                values = tomllib.load(file)
        except FileNotFoundError:
            raise ValueError(f"config file {os.fspath(path)!r} does not exist: pass the path of a TOML "
                             "file") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {os.fspath(path)!r} is not valid TOML ({err})") from None
        return cls.from_mapping({**values, **overrides}, source=f"config file {os.fspath(path)!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_mapping(json.loads(text))


def pass_items(value: Any) -> tuple[dict[str, Any], ...]:
    """Graph passes in their plain form ``({"name": ..., <config fields>}, ...)`` from pass objects,
    plain forms or JSON text of a list of them; one ValueError naming what is wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except ValueError:
            raise ValueError(f"passes = {value!r:.80} is not JSON: expected a list such as "
                             '[{"name": "random_ltd", "min_tokens": 8, "num_steps": 100}]') from None
    if isinstance(value, Mapping) or not isinstance(value, Sequence):
        raise ValueError(f"passes = {value!r:.80} is invalid: expected a list of autopar.passes objects or "
                         '{"name": ..., ...} tables')
    items = []
    for item in value:
        if isinstance(item, GraphPass) and dataclasses.is_dataclass(item):
            item = {"name": item.name, **{f.name: getattr(item, f.name) for f in dataclasses.fields(item)}}
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise ValueError(f"passes: {item!r:.80} is neither an autopar.passes object nor a table with a "
                             f"\"name\" (one of {sorted(PASS_TYPES)})")
        items.append(dict(item))
    _graph_passes(items)
    return tuple(items)


def _graph_passes(items: Sequence[Mapping[str, Any]]) -> list[GraphPass]:
    passes = []
    for item in items:
        cls = PASS_TYPES.get(item["name"])
        if cls is None:
            raise ValueError(f"passes: unknown pass {item['name']!r}; known passes are {sorted(PASS_TYPES)}")
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in item.items() if k != "name"}
        unknown = sorted(set(config) - {f.name for f in dataclasses.fields(cls)})
        try:
            if unknown:
                raise ValueError(f"unknown option(s) {unknown}")
            passes.append(cls(**config))
        except (TypeError, ValueError, OverflowError) as err:
            raise ValueError(f"passes: invalid {item['name']} pass: {err}") from None
    try:
        return check_passes(passes)
    except (TypeError, ValueError) as err:
        raise ValueError(f"passes: {err}") from None


def field_types() -> dict[str, type]:
    """Field name → the plain type a command-line flag parses (``int``, ``float``, ``str``, ``bool``);
    ``fix`` and ``betas`` are parsed by the CLI itself."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: _plain(hints[f.name]) for f in dataclasses.fields(TrainConfig)}


def _plain(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _plain(args[0])
    return typing.get_origin(hint) or hint


def _coerce(name: str, value: Any, hint: Any) -> Any:
    wanted = field_types()[name]
    if name == "passes" and isinstance(value, str | list | tuple):
        return value  # JSON text or a list of tables: checked by pass_items
    if value is None or isinstance(value, wanted) and not (wanted is int and isinstance(value, bool)):
        return value
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if wanted is tuple and isinstance(value, list):
        return tuple(value)
    raise ValueError(f"{name} = {value!r} is invalid: expected {wanted.__name__} (field type {hint})")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive_number(value: Any) -> bool:
    return _number(value) and value > 0


def _positive_int(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if type(value) is not int or value < 1:
            raise ValueError(f"{name} = {value!r} is invalid: expected an int >= 1")


def _non_negative_int(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if type(value) is not int or value < 0:
            raise ValueError(f"{name} = {value!r} is invalid: expected an int >= 0")


def _fraction(config: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not _number(value) or not 0 <= value <= 1:
            raise ValueError(f"{name} = {value!r} is invalid: expected a number in [0, 1]")

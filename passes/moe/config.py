"""The MoE pass's configuration (:class:`MoEConfig`, the fields of ``autopar.passes.MoE``) and its
validation.

Data flow: the user (or ``autopar run``'s JSON, ``autopar.runtime.pass_state``) builds ``MoE(...)``
→ ``__post_init__`` checks every field, naming the value, what is allowed and the fix →
``autopar.transform``/``autopar.compile`` run it as a pass (``MoE.apply`` in
:mod:`autopar.passes.moe.transform`, which subclasses this record).
Every field is a str, number, bool, None or tuple of ints, so the config round-trips through JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

LAYER_CHOICES = ("every_other", "second_half", "existing")
GATES = ("topk", "dts")
DEFAULT_NUM_EXPERTS = 8


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Mixture-of-Experts layers: ``autopar.transform(model, x, passes=[MoE(...)])``.

    ``layers``: ``"every_other"`` (layers 1, 3, 5, …, as Switch/GLaM), ``"second_half"``, a tuple of
    repeated-layer indices — their feed-forward blocks are upcycled (``upcycle``: experts copy the
    dense MLP, else freshly drawn) — or ``"existing"``: the model's own sparse-MoE blocks (HF
    Mixtral) become autopar MoE layers with the same weights and function.

    ``num_experts``: E per MoE layer; a tuple gives one count per chosen layer in increasing layer
    order (Pyramid-MoE, e.g. ``layers=(1, 3, 5, 7), num_experts=(4, 4, 8, 8)``). ``top_k``: experts
    per token. None means the default, filled in at construction when upcycling (so ``MoE() ==
    MoE(num_experts=8, top_k=2)``): E = 8; k = 2 (GShard), or 1 with ``gate="dts"`` or
    ``residual`` (EvoMoE, DeepSpeed-MoE). With ``"existing"`` None means the model's, and given
    values must match the model's. Capacity per expert is ``ceil(factor · tokens · top_k / E)``
    with ``capacity_factor`` in training and ``eval_capacity_factor`` in eval mode, or every token
    with ``dropless`` (None: True for ``"existing"``, whose blocks drop nothing, else False).

    ``gate``: ``"topk"`` or ``"dts"``, the dense-to-sparse gate (``passes/moe/gates.py``): Gumbel-
    softmax over all experts at a temperature going linearly from ``dts_start_temperature`` to
    ``dts_end_temperature`` over ``dts_anneal_steps`` training steps, weights below
    ``dts_threshold`` cut; from then on top-``top_k`` routing. ``residual``: Residual-MoE
    (DeepSpeed-MoE), the dense MLP kept beside the experts and mixed with them per token.
    ``seed`` draws the routers (layer ℓ uses ``seed + ℓ``), the DTS noise and fresh experts.
    """

    name: ClassVar[str] = "moe"

    num_experts: int | tuple[int, ...] | None = None
    top_k: int | None = None
    layers: str | tuple[int, ...] = "every_other"
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    dropless: bool | None = None
    upcycle: bool = True
    residual: bool = False
    gate: Literal["topk", "dts"] = "topk"
    dts_start_temperature: float = 2.0
    dts_end_temperature: float = 0.3
    dts_anneal_steps: int = 1000
    dts_threshold: float = 0.02
    aux_loss_weight: float = 1e-2
    z_loss_weight: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        _check_layers(self)
        _check_num_experts(self)
        _check_numbers(self)
        _check_flags(self)
        _check_gate(self)
        if not self.adopts:
            if self.num_experts is None:
                object.__setattr__(self, "num_experts", DEFAULT_NUM_EXPERTS)
            if self.top_k is None:
                object.__setattr__(self, "top_k", 1 if self.gate == "dts" or self.residual else 2)
        _check_top_k(self)

    @property
    def adopts(self) -> bool:
        """Whether the pass adopts the model's own sparse-MoE blocks (``layers="existing"``)."""
        return self.layers == "existing"

    def is_dropless(self) -> bool:
        return self.adopts if self.dropless is None else self.dropless

    def experts_for(self, layers: tuple[int, ...]) -> dict[int, int | None]:
        """Layer → E for the chosen ``layers`` (None: the model's, with ``"existing"``)."""
        if isinstance(self.num_experts, tuple):
            if len(self.num_experts) != len(layers):
                count = len(self.num_experts)
                raise ValueError(f"MoE.num_experts = {self.num_experts} gives {count} counts, "
                                 f"but MoE.layers = {self.layers!r} chose {len(layers)} layers "
                                 f"{list(layers)}: give one count per chosen layer")
            return dict(zip(layers, self.num_experts, strict=True))
        return dict.fromkeys(layers, self.num_experts)


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(config: MoEConfig, field_name: str, expectation: str) -> None:
    raise ValueError(f"MoE.{field_name} = {getattr(config, field_name)!r} is invalid: expected {expectation}")


def _index_tuple(value: Any) -> tuple[Any, ...] | None:
    return tuple(value) if isinstance(value, (list, tuple, range)) else None


def _check_layers(config: MoEConfig) -> None:
    if isinstance(config.layers, str):
        if config.layers not in LAYER_CHOICES:
            _fail(config, "layers", "'every_other', 'second_half', 'existing' (the model's own sparse-MoE "
                  "blocks) or a tuple of layer indices, e.g. (1, 3)")
        return
    layers = _index_tuple(config.layers)
    valid = bool(layers) and all(type(i) is int and i >= 0 for i in layers)  # type: ignore[union-attr]
    if not valid or len(set(layers)) != len(layers):  # type: ignore[arg-type]
        _fail(config, "layers", "'every_other', 'second_half', 'existing' or distinct layer indices >= 0, "
              "e.g. (1, 3)")
    counts = _index_tuple(config.num_experts)
    if counts is not None and len(counts) == len(layers):  # type: ignore[arg-type]
        pairs = sorted(zip(layers, counts, strict=True))  # type: ignore[arg-type]
        object.__setattr__(config, "num_experts", tuple(c for _, c in pairs))
    object.__setattr__(config, "layers", tuple(sorted(layers)))  # type: ignore[arg-type]


def _check_num_experts(config: MoEConfig) -> None:
    value = config.num_experts
    if value is None or (type(value) is int and value >= 2):
        return
    counts = _index_tuple(value)
    if not counts or not all(type(c) is int and c >= 2 for c in counts):
        _fail(config, "num_experts", "an int >= 2 (e.g. 8), a tuple of such ints with one count per chosen "
              "layer (Pyramid-MoE, e.g. (4, 8)), or None (8, or the model's with layers='existing')")
    if isinstance(config.layers, tuple) and len(counts) != len(config.layers):  # type: ignore[arg-type]
        raise ValueError(f"MoE.num_experts = {value!r} gives {len(counts)} counts, but MoE.layers = "  # type: ignore[arg-type]
                         f"{config.layers} names {len(config.layers)} layers: give one count per layer")
    object.__setattr__(config, "num_experts", counts)


def _check_top_k(config: MoEConfig) -> None:
    if config.top_k is None:
        return
    counts = config.num_experts if isinstance(config.num_experts, tuple) else (config.num_experts,)
    known = [c for c in counts if c is not None]
    bound = min(known) if known else None
    if type(config.top_k) is not int or config.top_k < 1 or (bound is not None and config.top_k > bound):
        limit = "an int >= 1" if bound is None else (
            f"an int in [1, num_experts = {bound}]" if len(set(known)) == 1 else
            f"an int in [1, min(num_experts) = {bound}]")
        _fail(config, "top_k", f"{limit}: 1 (Switch) or 2 (GShard/GLaM), or None for the default")


def _check_numbers(config: MoEConfig) -> None:
    for field_name in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(config, field_name)
        if not _real(value) or not value > 0:
            _fail(config, field_name, "a finite number > 0, e.g. 1.25; dropless=True never drops a token")
    for field_name in ("aux_loss_weight", "z_loss_weight"):
        value = getattr(config, field_name)
        if not _real(value) or value < 0:
            _fail(config, field_name, "a finite number >= 0")
    if type(config.seed) is not int or config.seed < 0:
        _fail(config, "seed", "an int >= 0")


def _check_flags(config: MoEConfig) -> None:
    if type(config.upcycle) is not bool:
        _fail(config, "upcycle", "True (experts copy the dense MLP) or False (experts freshly initialized)")
    if type(config.residual) is not bool:
        _fail(config, "residual", "True (Residual-MoE: dense MLP + experts) or False")
    if config.dropless is not None and type(config.dropless) is not bool:
        _fail(config, "dropless", "True (every expert takes every token), False (capacity_factor) or None")
    if config.adopts and config.residual:
        raise ValueError("MoE.residual = True is invalid with layers='existing': an adopted sparse-MoE block "
                         "has no dense MLP to keep; drop residual=True or upcycle dense layers instead")
    if config.adopts and not config.upcycle:
        raise ValueError("MoE.upcycle = False is invalid with layers='existing': adopted experts keep the "
                         "model's weights; drop upcycle=False")


def _check_gate(config: MoEConfig) -> None:
    if config.gate not in GATES:
        _fail(config, "gate", "'topk' (top-k routing) or 'dts' (dense-to-sparse gate, EvoMoE)")
    for field_name in ("dts_start_temperature", "dts_end_temperature"):
        value = getattr(config, field_name)
        if not _real(value) or not value > 0:
            _fail(config, field_name, "a finite number > 0, e.g. 2.0 (start) and 0.3 (end)")
    if type(config.dts_anneal_steps) is not int or config.dts_anneal_steps < 1:
        _fail(config, "dts_anneal_steps", "an int >= 1: training steps of the dense phase, e.g. 1000")
    if not _real(config.dts_threshold) or not 0 <= config.dts_threshold < 1:
        _fail(config, "dts_threshold", "a number in [0, 1): gate weights below it are cut, e.g. 0.02")

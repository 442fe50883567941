"""MoE gates beyond top-k: the dense-to-sparse gate (DTS-Gate, EvoMoE) and its step counter.

Data flow: ``MoE(gate="dts")`` (``passes/moe/transform.py``) installs one :class:`MoERuntime` at ``gm.moe``
and gives every :class:`~autopar.passes.moe.layer.MoELayer` a :class:`DTSGate` that reads the
runtime's step; the compiled model moves that step (``autopar.runtime.pass_state``, like
random-LTD's runtime) and saves it. The gate turns the router logits into a
:class:`~autopar.passes.moe.layer.Routing` that ``run_local_experts`` and the expert-parallel
runtime consume unchanged.

DTS-Gate (Nie et al., EvoMoE, TECHNIQUES.md §7), for steps ``t < N`` (``anneal_steps``)::

    τ(t) = τ₀ + (τ₁ − τ₀) · t / N                      (linear from start to end temperature)
    y    = softmax((logits + g) / τ(t)),  g ~ Gumbel(0, 1) in training, g = 0 in eval
    every expert is a slot (k = E, sorted by y); slots with y < threshold are cut (the best one
    always stays), the rest renormalized to sum 1; capacity = T (nothing dropped).

For ``t ≥ N`` the gate is the layer's sparse top-k routing with its capacity (``top_k`` 1 by
default: EvoMoE's top-1). The Gumbel noise is drawn from a generator seeded by (seed, step,
layer, first sample of this process's shard, call index within the step), so data-parallel and
pipeline processes agree on it run after run; calls made during backward (activation
recomputation) are counted apart, so a recomputed layer draws the noise its forward drew.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from autopar.passes.moe.layer import Routing, route

if TYPE_CHECKING:
    from autopar.passes.moe.layer import MoELayer

RUNTIME = "moe"  # gm.moe: the PassRuntime of the MoE pass


def dts_temperature(step: int, *, start: float, end: float, anneal_steps: int) -> float:
    """``τ(t)``: linear from ``start`` at step 0 to ``end`` at ``anneal_steps`` (and after)."""
    if step >= anneal_steps:
        return end
    return start + (end - start) * max(step, 0) / anneal_steps


def gumbel_noise(shape: torch.Size, *, seed: int, device: torch.device) -> torch.Tensor:
    """Standard Gumbel samples ``−log(−log u)``, ``u ~ U(0, 1)``, from a generator seeded by ``seed``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))


def dts_route(logits: torch.Tensor, *, temperature: float, threshold: float,
              noise: torch.Tensor | None = None) -> Routing:
    """Dense phase of DTS-Gate: every expert a slot, weights below ``threshold`` cut (module docstring)."""
    logits = logits.float()
    scores = logits if noise is None else logits + noise
    probs = (scores / temperature).softmax(dim=-1)  # (T, E)
    ranked, experts = probs.sort(dim=-1, descending=True)
    routed = ranked >= threshold
    routed[:, 0] = True  # the best expert stays even when E · threshold > 1 cuts them all
    kept_weight = ranked * routed
    weights = kept_weight / kept_weight.sum(dim=-1, keepdim=True)
    return Routing(logits=logits, probs=probs, experts=experts, weights=weights, kept=routed,
                   capacity=logits.shape[0], routed=routed)


def _seed(*parts: int) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class MoERuntime(nn.Module):
    """Installed at ``gm.moe`` by the pass (gate ``"dts"``): the training step the gates read.

    The :class:`~autopar.runtime.pass_state.PassRuntime` protocol: ``set_step``, ``advance``,
    ``state_dict`` (``{"step": int}``), ``load_state_dict``, ``train``. It holds no tensors.
    """

    KEYS: ClassVar[tuple[str, ...]] = ("step",)

    def __init__(self, *, step: int = 0) -> None:
        super().__init__()
        self.step = step
        self._first_sample = 0
        self._calls: dict[tuple[int, bool], int] = {}

    def set_step(self, step: int, *, first_sample: int = 0) -> None:
        """Move to ``step``; this process's samples start at ``first_sample`` of the global batch."""
        for name, value in (("step", step), ("first_sample", first_sample)):
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} = {value!r} is invalid: expected an int >= 0")
        self.step, self._first_sample = step, first_sample
        self._calls.clear()

    def advance(self, batch_size: int) -> None:
        """After a training step: go to the next one."""
        self.set_step(self.step + 1)

    def noise_seed(self, seed: int, layer: int) -> int:
        """The seed of this call's Gumbel noise in ``layer`` (counts the call)."""
        key = (layer, torch._C._current_graph_task_id() != -1)  # -1 outside backward
        call = self._calls.get(key, 0)
        self._calls[key] = call + 1
        return _seed(seed, self.step, layer, self._first_sample, call)

    def state_dict(self, *args: Any, destination: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """``{"step": int}`` for checkpoints. (Called by a parent module's ``state_dict`` it adds
        nothing: the graph's state dict stays the model's.)"""
        if destination is not None or args:
            return destination if destination is not None else args[0]
        return {"step": self.step}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        state = dict(state_dict)
        if "step" not in state:
            raise ValueError(f"MoE pass state {state} has no 'step'; expected {{'step': int}} as written by "
                             "MoERuntime.state_dict()")
        step = state["step"]
        step = int(step.item()) if isinstance(step, torch.Tensor) else step
        self.set_step(step)


@dataclass(eq=False)
class DTSGate:
    """``MoELayer.gate`` for DTS-Gate (see the module docstring); reads the step from ``runtime``."""

    start_temperature: float
    end_temperature: float
    anneal_steps: int
    threshold: float
    seed: int
    runtime: MoERuntime

    def temperature(self, step: int | None = None) -> float:
        return dts_temperature(self.runtime.step if step is None else step, start=self.start_temperature,
                               end=self.end_temperature, anneal_steps=self.anneal_steps)

    def dense(self, step: int | None = None) -> bool:
        """Whether the gate is in its dense phase at ``step`` (default: the current step)."""
        return (self.runtime.step if step is None else step) < self.anneal_steps

    def __call__(self, layer: MoELayer, logits: torch.Tensor) -> Routing:
        if not self.dense():
            return route(logits, layer.top_k, layer.capacity(logits.shape[0]))
        noise = None
        if layer.training:
            seed = self.runtime.noise_seed(self.seed, -1 if layer.layer is None else layer.layer)
            noise = gumbel_noise(logits.shape, seed=seed, device=logits.device)
        return dts_route(logits, temperature=self.temperature(), threshold=self.threshold, noise=noise)

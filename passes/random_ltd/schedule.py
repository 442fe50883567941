"""Random-LTD at run time: the kept-length schedule, its state, and the ops the pass inserts.

Data flow: ``RandomLTD`` (``passes/random_ltd/transform.py``) rewrites a graph so that each dropping
layer calls :class:`RandomLTDRuntime` (which tokens to keep, or None for all) and the
:func:`ltd_gather` / :func:`ltd_scatter` ops around the layer. The runtime reads its step
from :class:`RandomLTDState`, which goes into checkpoints; consumed layer-tokens can drive
the learning rate through :func:`layer_token_lr_scheduler`.

Schedule (DeepSpeed's ``fixed_linear``; ``min_value``/``require_steps``/``seq_per_step``
are ``min_tokens``/``num_steps``/``granularity`` here), for sequence length ``s``::

    k(t) = min_tokens + ⌊t × (s − min_tokens) / num_steps⌋, rounded down to a multiple of
           granularity, then clamped to [min_tokens, s];   k(t) = s for t ≥ num_steps.

Layer-tokens of one step of ``B`` sequences, ``n`` of ``L`` layers dropping:
``B × (n × k(t) + (L − n) × s)``.

Token choices depend on (seed, step, layer, sample) only, where ``sample`` is the sample's
index in the step's global batch: a pipeline's microbatches and data-parallel shards (which
say where their first sample sits through ``set_step(step, first_sample=...)``) keep exactly
the tokens a single device keeps for the whole batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn


def kept_tokens(step: int, *, seq_len: int, min_tokens: int, num_steps: int, granularity: int = 1) -> int:
    """Tokens each sample keeps in a dropping layer at ``step`` (see the module docstring)."""
    if step >= num_steps or min_tokens >= seq_len:
        return seq_len
    return _rounded(min_tokens + max(step, 0) * (seq_len - min_tokens) // num_steps, seq_len=seq_len,
                    min_tokens=min_tokens, granularity=granularity)


def _rounded(value: int, *, seq_len: int, min_tokens: int, granularity: int) -> int:
    return min(max(value - value % granularity, min_tokens), seq_len)


def mean_kept_fraction(*, seq_len: int, min_tokens: int, num_steps: int, granularity: int = 1) -> float:
    """The kept fraction ``k(t)/s`` averaged over the dropping phase (steps 0 … num_steps − 1).

    The unrounded length ``min_tokens + j`` holds for the steps t with ⌊t (s − min_tokens) / num_steps⌋ = j,
    i.e. ⌈j N / D⌉ ≤ t < ⌈(j + 1) N / D⌉ (N = num_steps, D = s − min_tokens): O(s), not O(N).
    """
    span = seq_len - min_tokens
    if span <= 0:
        return 1.0
    total = 0
    for j in range(span):
        first, end = -(-j * num_steps // span), min(num_steps, -(-(j + 1) * num_steps // span))
        if end > first:
            total += (end - first) * _rounded(min_tokens + j, seq_len=seq_len, min_tokens=min_tokens,
                                              granularity=granularity)
    return total / (num_steps * seq_len)


def layer_tokens_per_step(*, kept: int, seq_len: int, batch_size: int, num_layers: int,
                          num_ltd_layers: int) -> int:
    """``B × (n_ltd × k + (L − n_ltd) × s)``: token-layer evaluations of one step."""
    return batch_size * (num_ltd_layers * kept + (num_layers - num_ltd_layers) * seq_len)


@dataclass
class RandomLTDState:
    """The mutable part of random-LTD, saved in checkpoints.

    ``step`` is the training step the schedule reads; ``microbatch`` is one more component of
    the token choices' seed (0 unless a caller sets it; samples are already told apart by their
    index in the batch); ``consumed_layer_tokens`` sums :func:`layer_tokens_per_step` over the
    steps taken with :meth:`RandomLTDRuntime.advance`.
    """

    KEYS: ClassVar[tuple[str, ...]] = ("step", "microbatch", "consumed_layer_tokens")

    step: int = 0
    microbatch: int = 0
    consumed_layer_tokens: int = 0

    def state_dict(self) -> dict[str, int]:
        return {key: int(getattr(self, key)) for key in self.KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [key for key in self.KEYS if key not in state]
        if missing:
            raise ValueError(f"random-LTD state is missing {missing}; expected the keys {list(self.KEYS)} "
                             "written by RandomLTDRuntime.state_dict()")
        for key in self.KEYS:
            value = state[key]
            if isinstance(value, torch.Tensor):
                value = int(value.item())
            if type(value) is not int or value < 0:
                raise ValueError(f"random-LTD state {key} = {value!r} is invalid: expected an int >= 0")
            setattr(self, key, value)


def _seed(*parts: int) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class RandomLTDRuntime(nn.Module):
    """Installed at ``gm.random_ltd`` by the pass: chooses the kept tokens of each dropping layer.

    Called in the graph as ``random_ltd(hidden, layer)``; returns the sorted kept positions
    ``(b, k)`` (int64), or None when every token is kept (k = s, or this module in eval mode:
    ``gm.eval()`` reaches it in fx graphs; export graphs cannot switch modes, so call
    ``random_ltd_runtime(gm).eval()``), in which case the gather and scatter ops pass their
    inputs through untouched.

    Sample indices: the calls for one layer since :meth:`set_step` cover consecutive samples,
    starting at ``first_sample``: a pipeline runs its microbatches through a layer in order.
    Calls made while autograd runs a backward pass (activation recomputation) are counted
    apart, so a recomputed layer keeps the tokens its forward kept.
    """

    def __init__(self, *, min_tokens: int, num_steps: int, granularity: int, seed: int, seq_len: int,
                 num_layers: int, layers: tuple[int, ...], step: int = 0) -> None:
        super().__init__()
        self.min_tokens, self.num_steps, self.granularity = min_tokens, num_steps, granularity
        self.seed, self.seq_len, self.num_layers, self.layers = seed, seq_len, num_layers, layers
        self.state = RandomLTDState(step=step)
        self.last_kept: dict[int, int] = {}
        self._probe: int | None = None
        self._first_sample = 0
        self._samples_seen: dict[tuple[int, bool], int] = {}

    def kept_tokens(self, step: int | None = None, *, seq_len: int | None = None) -> int:
        """Tokens kept per sample in a dropping layer at ``step`` (default: the current step)."""
        return kept_tokens(self.state.step if step is None else step, seq_len=seq_len or self.seq_len,
                           min_tokens=self.min_tokens, num_steps=self.num_steps,
                           granularity=self.granularity)

    def set_step(self, step: int, *, microbatch: int = 0, first_sample: int = 0) -> None:
        """Move the schedule to ``step`` (e.g. the trainer's step counter, or after resuming);
        the next call per layer starts at sample ``first_sample`` of the step's global batch."""
        for name, value in (("step", step), ("microbatch", microbatch), ("first_sample", first_sample)):
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} = {value!r} is invalid: expected an int >= 0")
        self.state.step, self.state.microbatch = step, microbatch
        self._first_sample = first_sample
        self._samples_seen.clear()

    def layer_tokens_per_step(self, batch_size: int, step: int | None = None) -> int:
        return layer_tokens_per_step(kept=self.kept_tokens(step), seq_len=self.seq_len, batch_size=batch_size,
                                     num_layers=self.num_layers, num_ltd_layers=len(self.layers))

    def advance(self, batch_size: int) -> None:
        """Count the finished step's layer-tokens (``batch_size`` sequences) and go to the next step."""
        self.state.consumed_layer_tokens += self.layer_tokens_per_step(batch_size)
        self.set_step(self.state.step + 1)

    def state_dict(self, *args: Any, destination: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """The schedule state, for checkpoints. (Called by a parent module's ``state_dict``, it adds
        nothing: the graph's state dict stays the model's, loadable into the untransformed model.)"""
        if destination is not None or args:
            return destination if destination is not None else args[0]
        return self.state.state_dict()

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self.state.load_state_dict(dict(state_dict))
        self.set_step(self.state.step, microbatch=self.state.microbatch)

    @contextlib.contextmanager
    def probing(self, kept: int) -> Iterator[None]:
        """Keep the first ``kept`` tokens of every sample, in training mode (the pass's shape check)."""
        saved, self._probe = self._probe, kept
        try:
            yield
        finally:
            self._probe = saved

    def _first_of(self, layer: int, batch: int) -> int:
        """Index of this call's first sample in the step's batch (see the class docstring). The
        graph task id is -1 outside backward; torch.utils.checkpoint reads it the same way."""
        key = (layer, torch._C._current_graph_task_id() != -1)
        seen = self._samples_seen.get(key, 0)
        self._samples_seen[key] = seen + batch
        return self._first_sample + seen

    def forward(self, hidden: torch.Tensor, layer: int) -> torch.Tensor | None:
        b, s = hidden.shape[0], hidden.shape[1]
        if self._probe is not None:
            return torch.arange(self._probe, device=hidden.device).expand(b, self._probe)
        if not self.training:
            return None
        k = self.kept_tokens(seq_len=s)
        self.last_kept[layer] = k
        first = self._first_of(layer, b)
        if k >= s:
            return None
        step, microbatch = self.state.step, self.state.microbatch
        generators = (torch.Generator().manual_seed(_seed(self.seed, step, layer, microbatch, i))
                      for i in range(first, first + b))
        scores = torch.stack([torch.rand(s, generator=g) for g in generators])
        kept = scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # (b, k), causal order
        return kept.to(hidden.device)


def ltd_gather(value: torch.Tensor, kept: torch.Tensor | None, dims: tuple[int, ...]) -> torch.Tensor:
    """``value`` at the kept positions along each of ``dims`` (a batch dim of 1 is expanded first)."""
    if kept is None:
        return value
    b, k = kept.shape
    if value.shape[0] != b:
        value = value.expand(b, *value.shape[1:])
    for dim in dims:
        view = [1] * value.dim()
        view[0], view[dim] = b, k
        size = list(value.shape)
        size[dim] = k
        value = value.gather(dim, kept.reshape(view).expand(size))
    return value


def ltd_scatter(hidden: torch.Tensor, output: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """The layer's ``output`` (b, k, ...) at the kept positions of ``hidden`` (b, s, ...); elsewhere
    ``hidden`` unchanged (the dropped tokens skip the layer)."""
    if kept is None:
        return output
    index = kept.reshape(*kept.shape, *([1] * (output.dim() - 2))).expand(output.shape)
    return hidden.to(output.dtype).scatter(1, index, output)


def ltd_seq_len(hidden: torch.Tensor) -> int:
    """The (kept) sequence length of ``hidden`` (b, s, ...): replaces the literal s in reshapes."""
    return int(hidden.shape[1])


Decay = Literal["cosine", "linear", "constant"]


def layer_token_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    consumed: RandomLTDRuntime | RandomLTDState | Callable[[], int],
    *,
    warmup_layer_tokens: int,
    total_layer_tokens: int,
    decay: Decay = "cosine",
    min_ratio: float = 0.0,
    factor: Callable[[int], float] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` whose multiplier follows consumed layer-tokens instead of steps.

    Linear warm-up over ``warmup_layer_tokens``, then ``decay`` to ``min_ratio`` at
    ``total_layer_tokens``; or any ``factor(consumed) -> float``. Call ``scheduler.step()``
    after ``runtime.advance(batch_size)``.
    """
    if isinstance(consumed, RandomLTDRuntime):
        consumed = consumed.state
    read = consumed if callable(consumed) else (lambda: consumed.consumed_layer_tokens)  # type: ignore[union-attr]
    if factor is None:
        if decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"decay = {decay!r} is invalid: expected 'cosine', 'linear' or 'constant'")
        if not 0 <= warmup_layer_tokens < total_layer_tokens:
            raise ValueError(f"need 0 <= warmup_layer_tokens ({warmup_layer_tokens}) < total_layer_tokens "
                             f"({total_layer_tokens})")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"min_ratio = {min_ratio!r} is invalid: expected a fraction in [0, 1]")
        factor = _warmup_decay(warmup_layer_tokens, total_layer_tokens, decay, min_ratio)
    chosen = factor
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: chosen(int(read())))


def _warmup_decay(warmup: int, total: int, decay: Decay, min_ratio: float) -> Callable[[int], float]:
    def factor(tokens: int) -> float:
        if tokens < warmup:
            return (tokens + 1) / (warmup + 1)
        progress = min(1.0, (tokens - warmup) / (total - warmup))
        if decay == "constant":
            return 1.0
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * shape

    return factor

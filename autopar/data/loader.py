"""Per-rank token batches for training and held-out evaluation: each rank reads only its rows.

Data flow: :class:`autopar.data.Corpus` + :class:`autopar.data.BPETokenizer` →
:func:`autopar.data.token_stream` (cached, FIM optional) → :class:`TokenWindows` (window ``k`` is
tokens ``[k·L, k·L + L + 1)``, ``L = seq_len``; documents are packed across windows, separated by
the end-of-text id) → :class:`TokenLoader` → :class:`Batch` per step → the training step.

Global batch ``t`` is ``G = global_batch_size`` window ids: in epoch ``e = t // steps_per_epoch`` the
windows are shuffled by a generator seeded with (``seed``, ``e``) and batch ``t`` takes the next
``G``; with a :class:`autopar.data.CurriculumSampler` batch ``t`` is ``sampler.batch(t)`` instead.
Every rank computes the same ids (cheap), then reads only its rows: data-parallel rank ``r`` of
``dp`` takes rows ``[r·G/dp, (r+1)·G/dp)`` — the chunk ``torch.chunk(global_batch, dp)[r]`` that
the runtime's per-rank slicing would take. Context-parallel ranks of one dp group read the same
rows and the loader returns the whole sequence: the runtime cuts it along the sequence dimension
(``seq_len`` must divide by ``cp``). Pipeline ranks that take neither inputs nor labels pass
``reads_data=False``: they read no rows and get ``tokens=None``, but keep step with the others
(they open the cached token file only for its length).
``samples_read`` counts the rows this rank read.

Resume: :meth:`TokenLoader.state_dict` is plain JSON (seed, step, epoch, position, batch geometry,
stream key); loading it continues with exactly the batch an uninterrupted run would read next,
on any dp degree. A sequence-length curriculum (``seq_len_pacing``) cuts batch ``t`` to
``pacing(t)`` inputs with :func:`autopar.data.truncate_batch`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from autopar.data._files import check_int
from autopar.data.corpus import Corpus
from autopar.data.curriculum import CurriculumSampler, truncate_batch
from autopar.data.stream import TokenStream, token_stream
from autopar.data.tokenizer import BPETokenizer

STATE_FORMAT = 1


@dataclass(frozen=True)
class Batch:
    """This rank's rows of one global batch: ``tokens`` is int64 ``[rows, length + 1]`` (``None`` on a
    rank that reads nothing); ``rows`` are their window ids."""

    tokens: torch.Tensor | None
    step: int
    epoch: int
    rows: tuple[int, ...]

    @property
    def inputs(self) -> torch.Tensor | None:
        return None if self.tokens is None else self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor | None:
        return None if self.tokens is None else self.tokens[:, 1:]


class TokenWindows:
    """A token stream as a dataset of ``seq_len + 1``-token windows (``windows[k]`` is a 1-D int64
    tensor); feed it to ``DifficultyIndex.build`` or ``token_counts`` for a curriculum."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, (self.tokens.shape[0] - 1) // self.seq_len)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.rows([index])[0]

    def rows(self, indices: list[int]) -> torch.Tensor:
        if any(not 0 <= k < len(self) for k in indices):
            raise IndexError(f"window ids {indices} out of range [0, {len(self)})")
        length = self.seq_len
        rows = [self.tokens[k * length: k * length + length + 1] for k in indices]
        return torch.from_numpy(np.stack(rows).astype(np.int64)).reshape(len(indices), length + 1)


def _check_layout(global_batch_size: int, seq_len: int, dp_degree: int, dp_rank: int, cp_degree: int,
                  cp_rank: int, max_seq_len: int | None) -> None:
    for name, value, low in (("global_batch_size", global_batch_size, 1), ("seq_len", seq_len, 1),
                             ("dp_degree", dp_degree, 1), ("dp_rank", dp_rank, 0),
                             ("cp_degree", cp_degree, 1), ("cp_rank", cp_rank, 0)):
        check_int(name, value, low)
    for axis, rank, degree in (("dp", dp_rank, dp_degree), ("cp", cp_rank, cp_degree)):
        if rank >= degree:
            raise ValueError(f"{axis}_rank = {rank} is out of range for {axis}_degree = {degree}: expected "
                             f"0 <= {axis}_rank < {degree}")
    if global_batch_size % dp_degree:
        per_rank = global_batch_size // dp_degree
        raise ValueError(f"global_batch_size = {global_batch_size} does not divide over dp = {dp_degree}: "
                         f"{global_batch_size} / {dp_degree} = {global_batch_size / dp_degree:g} rows per "
                         f"rank; use a multiple of {dp_degree}, e.g. {max(per_rank, 1) * dp_degree} or "
                         f"{(per_rank + 1) * dp_degree}")
    if max_seq_len is not None and seq_len > max_seq_len:
        raise ValueError(f"seq_len = {seq_len} exceeds max_seq_len = {max_seq_len} (the longest sequence "
                         f"the model takes): pass seq_len <= {max_seq_len}")
    if seq_len % cp_degree:
        raise ValueError(f"seq_len = {seq_len} does not divide over cp = {cp_degree}: {seq_len} / "
                         f"{cp_degree} = {seq_len / cp_degree:g} tokens per rank; use a multiple of "
                         f"{cp_degree}")


class TokenLoader:
    """Batches of ``corpus``'s train split for one rank (see the module docstring); iterate it for
    :class:`Batch` objects, forever (epochs roll over)."""

    def __init__(self, corpus: Corpus, tokenizer: BPETokenizer, *, global_batch_size: int, seq_len: int,
                 dp_degree: int = 1, dp_rank: int = 0, cp_degree: int = 1, cp_rank: int = 0,
                 reads_data: bool = True, seed: int = 0, max_seq_len: int | None = None,
                 fim_rate: float = 0.0, fim_spm_rate: float = 0.5,
                 seq_len_pacing: Callable[[int], float] | None = None,
                 sampler: CurriculumSampler | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        _check_layout(global_batch_size, seq_len, dp_degree, dp_rank, cp_degree, cp_rank, max_seq_len)
        check_int("seed", seed, 0)
        self.corpus, self.tokenizer, self.cache_dir = corpus, tokenizer, cache_dir
        self.global_batch_size, self.seq_len, self.seed = global_batch_size, seq_len, seed
        self.dp_degree, self.dp_rank, self.cp_degree, self.cp_rank = dp_degree, dp_rank, cp_degree, cp_rank
        self.reads_data, self.seq_len_pacing, self.sampler = bool(reads_data), seq_len_pacing, sampler
        self.stream = token_stream(corpus, tokenizer, split="train", fim_rate=fim_rate,
                                   fim_spm_rate=fim_spm_rate, fim_seed=seed, cache_dir=cache_dir)
        self.windows = TokenWindows(self.stream.tokens, seq_len)
        self._check_size(self.stream, global_batch_size, "global_batch_size")
        self._check_sampler()
        self.step, self.samples_read, self.eval_samples_read = 0, 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def _check_size(self, stream: TokenStream, batch_size: int, name: str) -> None:
        windows = (stream.num_tokens - 1) // self.seq_len
        if windows < batch_size:
            raise ValueError(f"the {stream.split} split has {stream.num_tokens:,} tokens = {windows} windows "
                             f"of seq_len + 1 = {self.seq_len + 1} tokens, fewer than {name} = {batch_size}: "
                             "use a larger corpus, a smaller batch or a shorter seq_len")

    def _check_sampler(self) -> None:
        if self.sampler is None:
            return
        if not isinstance(self.sampler, CurriculumSampler):
            raise TypeError(f"sampler must be an autopar.data.CurriculumSampler, got "
                            f"{type(self.sampler).__name__}")
        if self.sampler.batch_size != self.global_batch_size or len(self.sampler.index) != len(self.windows):
            raise ValueError(f"the curriculum sampler draws {self.sampler.batch_size} of "
                             f"{len(self.sampler.index)} samples, but this loader has global_batch_size = "
                             f"{self.global_batch_size} and {len(self.windows)} windows: build the "
                             "DifficultyIndex over loader.windows and the sampler with "
                             "batch_size=global_batch_size")

    @property
    def local_batch_size(self) -> int:
        """Rows per step on this rank (``global_batch_size / dp_degree``)."""
        return self.global_batch_size // self.dp_degree

    @property
    def steps_per_epoch(self) -> int:
        return len(self.windows) // self.global_batch_size

    def global_rows(self, step: int) -> list[int]:
        """The window ids of global batch ``step`` (all ranks; reads no tokens)."""
        if self.sampler is not None:
            return list(self.sampler.batch(step))
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
            self._order = (epoch, order)
        start = position * self.global_batch_size
        return self._order[1][start:start + self.global_batch_size].tolist()

    def _local(self, rows: list[int], count: int) -> list[int]:
        size = count // self.dp_degree
        return rows[self.dp_rank * size:(self.dp_rank + 1) * size]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        step = self.step
        rows = self._local(self.global_rows(step), self.global_batch_size)
        tokens = None
        if self.reads_data:
            tokens = self.windows.rows(rows)
            self.samples_read += len(rows)
            if self.seq_len_pacing is not None:
                tokens = truncate_batch(tokens, self.paced_length(step) + 1)
        self.step += 1
        return Batch(tokens, step, step // self.steps_per_epoch, tuple(rows))

    def paced_length(self, step: int) -> int:
        """Input tokens at ``step`` under ``seq_len_pacing``: ``int(pacing(step))`` kept in
        ``[1, seq_len]`` and rounded down to a multiple of ``cp_degree`` (at least ``cp_degree``)."""
        if self.seq_len_pacing is None:
            return self.seq_len
        length = min(self.seq_len, max(1, int(self.seq_len_pacing(step))))
        return max(self.cp_degree, length // self.cp_degree * self.cp_degree)

    def eval_batches(self, *, batch_size: int | None = None, max_batches: int | None = None,
                     fim_rate: float = 0.0) -> Iterator[Batch]:
        """This rank's rows of the held-out split in order (no shuffle), in global batches of
        ``batch_size`` (default ``global_batch_size``) windows; ``fim_rate=1.0`` for a fill-in-the-middle
        held-out loss. Does not move the training position."""
        batch_size = self.global_batch_size if batch_size is None else batch_size
        _check_layout(batch_size, self.seq_len, self.dp_degree, self.dp_rank, self.cp_degree, self.cp_rank,
                      None)
        stream = token_stream(self.corpus, self.tokenizer, split="heldout", fim_rate=fim_rate,
                              fim_seed=self.seed, cache_dir=self.cache_dir)
        self._check_size(stream, batch_size, "the eval batch_size")
        windows = TokenWindows(stream.tokens, self.seq_len)
        count = len(windows) // batch_size
        if max_batches is not None:
            check_int("max_batches", max_batches, 0)
            count = min(count, max_batches)
        for index in range(count):
            rows = self._local(list(range(index * batch_size, (index + 1) * batch_size)), batch_size)
            tokens = None
            if self.reads_data:
                tokens = windows.rows(rows)
                self.eval_samples_read += len(rows)
            yield Batch(tokens, index, 0, tuple(rows))

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch starts, as JSON-able ints and strings (the dp layout is not in it: a
        run may resume on another dp degree and read the same global batches)."""
        epoch, position = divmod(self.step, self.steps_per_epoch)
        state = {"format": STATE_FORMAT, "seed": self.seed, "step": self.step, "epoch": epoch,
                 "position": position, "global_batch_size": self.global_batch_size, "seq_len": self.seq_len,
                 "stream": self.stream.key}
        if self.sampler is not None:
            state["sampler_seed"] = self.sampler.seed
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`); refuses a state of another corpus, seed or
        batch geometry, naming the difference."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a TokenLoader state of format {STATE_FORMAT}: {state!r:.200}")
        mine = self.state_dict()
        for key in ("seed", "global_batch_size", "seq_len", "stream", "sampler_seed"):
            if state.get(key) != mine.get(key):
                raise ValueError(f"the saved data loader state has {key} = {state.get(key)!r} but this "
                                 f"loader has {mine.get(key)!r}: build the loader with the saved run's "
                                 "corpus, tokenizer and settings to resume")
        step = state.get("step")
        if type(step) is not int or step < 0 or divmod(step, self.steps_per_epoch) != (state.get("epoch"),
                                                                                       state.get("position")):
            raise ValueError(f"the saved data loader state is inconsistent: step = {step!r}, epoch = "
                             f"{state.get('epoch')!r}, position = {state.get('position')!r} with "
                             f"{self.steps_per_epoch} steps per epoch")
        self.step = step

    def describe(self) -> str:
        return (f"{self.stream.describe()}; {len(self.windows)} windows of {self.seq_len + 1} tokens, "
                f"{self.steps_per_epoch} steps per epoch of {self.global_batch_size} "
                f"(dp rank {self.dp_rank}/{self.dp_degree} reads {self.local_batch_size})")

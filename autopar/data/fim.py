"""Fill-in-the-middle (FIM; Bavarian et al. 2022): a data transform for pretraining code models.

Data flow: a document (a ``str`` for character-level FIM, before tokenization; a token list or
1-D tensor for token-level FIM) → :class:`FIMTransform` → the training sample. With probability
``rate`` the document is split at two uniformly random points into prefix, middle and suffix and
emitted as

    PSM: <PRE> prefix <SUF> suffix <MID> middle [<EOT>]
    SPM: <PRE> <SUF> suffix <MID> prefix middle [<EOT>]     (the paper's SPM variant)

(SPM with probability ``spm_rate``); otherwise it is returned unchanged. The choices for
document ``index`` depend only on (``seed``, ``index``), so workers and resumed runs agree.
:func:`undo_fim` inverts the transform.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

Level = Literal["char", "token"]
Sentinel = str | int


@dataclass(frozen=True, kw_only=True)
class FIMConfig:
    """``rate``: fraction of documents transformed; ``spm_rate``: fraction of those in SPM order.
    Sentinels are strings at ``level="char"`` and token ids at ``level="token"``; ``eot`` (optional)
    ends the middle."""

    rate: float = 0.5
    spm_rate: float = 0.5
    level: Level = "char"
    prefix: Sentinel = "<PRE>"
    suffix: Sentinel = "<SUF>"
    middle: Sentinel = "<MID>"
    eot: Sentinel | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rate", "spm_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"FIMConfig.{name} = {value!r} is invalid: expected a fraction in [0, 1]")
        if self.level not in ("char", "token"):
            raise ValueError(f"FIMConfig.level = {self.level!r} is invalid: expected 'char' or 'token'")
        for name in ("prefix", "suffix", "middle", "eot"):
            value = getattr(self, name)
            if name == "eot" and value is None:
                continue
            if self.level == "char" and not (isinstance(value, str) and value):
                raise ValueError(f"FIMConfig.{name} = {value!r} is invalid at level='char': expected a "
                                 "non-empty string such as '<PRE>'")
            if self.level == "token" and not (type(value) is int and value >= 0):
                raise ValueError(f"FIMConfig.{name} = {value!r} is invalid at level='token': expected the "
                                 "sentinel's token id (an int >= 0), e.g. "
                                 "FIMConfig(level='token', prefix=50281, ...)")
        sentinels = [self.prefix, self.suffix, self.middle] + ([self.eot] if self.eot is not None else [])
        if len(set(sentinels)) != len(sentinels):
            raise ValueError(f"FIMConfig sentinels must differ, got {sentinels}")
        if type(self.seed) is not int:
            raise ValueError(f"FIMConfig.seed = {self.seed!r} is invalid: expected an int")


def _rng(seed: int, index: int) -> random.Random:
    digest = hashlib.blake2b(f"fim:{seed}:{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _pieces(document: Any, level: Level) -> tuple[list[Any] | str, type]:
    if level == "char":
        if not isinstance(document, str):
            raise TypeError(f"character-level FIM needs str documents, got {type(document).__name__}; "
                            "use FIMConfig(level='token', ...) for token ids")
        return document, str
    if isinstance(document, torch.Tensor):
        if document.dim() != 1:
            raise ValueError(f"token-level FIM needs 1-D token tensors, got shape {tuple(document.shape)}")
        return document.tolist(), torch.Tensor
    if isinstance(document, (list, tuple)):
        return list(document), type(document)
    raise TypeError(f"token-level FIM needs a list, tuple or 1-D tensor of token ids, got "
                    f"{type(document).__name__}")


def _rebuild(parts: list[Any] | str, kind: type, like: Any) -> Any:
    if kind is str:
        return parts
    if kind is torch.Tensor:
        return torch.tensor(parts, dtype=like.dtype, device=like.device)
    return kind(parts)


def _units(config: FIMConfig, kind: type) -> tuple[Any, Any, Any, Any]:
    """The sentinels as pieces of a document: strings, or one-token lists."""
    unit = (lambda x: x) if kind is str else (lambda x: [x])
    empty = "" if kind is str else []
    end = unit(config.eot) if config.eot is not None else empty
    return unit(config.prefix), unit(config.suffix), unit(config.middle), end


def _find(seq: Sequence[Any] | str, piece: Any) -> int:
    if isinstance(seq, str):
        return seq.find(piece)
    return list(seq).index(piece[0]) if piece[0] in seq else -1


class FIMTransform:
    """``FIMTransform(FIMConfig(...))(document, index)`` → the (possibly) FIM-ordered document."""

    def __init__(self, config: FIMConfig | None = None) -> None:
        self.config = config or FIMConfig()

    def __call__(self, document: Any, index: int) -> Any:
        config = self.config
        seq, kind = _pieces(document, config.level)
        rng = _rng(config.seed, index)
        if rng.random() >= config.rate:
            return document
        first, second = sorted((rng.randint(0, len(seq)), rng.randint(0, len(seq))))
        prefix, middle, suffix = seq[:first], seq[first:second], seq[second:]
        pre, suf, mid, end = _units(config, kind)
        if rng.random() < config.spm_rate:
            parts = pre + suf + suffix + mid + prefix + middle + end
        else:
            parts = pre + prefix + suf + suffix + mid + middle + end
        return _rebuild(parts, kind, document)


def undo_fim(sample: Any, config: FIMConfig) -> Any:
    """The document a FIM sample came from (samples not starting with <PRE> are returned as they are)."""
    seq, kind = _pieces(sample, config.level)
    pre, suf, mid, end = _units(config, kind)
    if seq[:len(pre)] != pre:
        return sample
    body = seq[len(pre):]
    if end and body[len(body) - len(end):] == end:
        body = body[:len(body) - len(end)]
    if body[:len(suf)] == suf:  # SPM: <SUF> suffix <MID> prefix middle
        body = body[len(suf):]
        at = _find(body, mid)
        if at < 0:
            raise ValueError("not a FIM sample of this config: no <MID> after <SUF>")
        return _rebuild(body[at + len(mid):] + body[:at], kind, sample)
    at_suf = _find(body, suf)
    after = body[at_suf + len(suf):]
    at_mid = _find(after, mid)
    if at_suf < 0 or at_mid < 0:
        raise ValueError("not a FIM sample of this config: <SUF> or <MID> missing after <PRE>")
    return _rebuild(body[:at_suf] + after[at_mid + len(mid):] + after[:at_mid], kind, sample)

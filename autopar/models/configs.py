"""Named model configurations of the zoo, with their published sources.

``autopar.models.build(name, **overrides)`` looks names up here. Shapes come from:
GPT-2 (Radford et al. 2019), BERT (Devlin et al. 2019), GPT-3 (Brown et al. 2020,
Table 2.1) and the Megatron-LM weak-scaling table (Narayanan et al. SC'21, Table 1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


def _positive(owner: str, name: str, value: Any) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"{owner}.{name} = {value!r} is invalid: expected an int >= 1")


@dataclass(frozen=True, kw_only=True)
class _TransformerConfig:
    """Fields every zoo transformer has. ``ffn_size`` 0 means 4 × hidden_size."""

    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    vocab_size: int = 128
    seq_len: int = 32
    ffn_size: int = 0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _validate(self)
        if self.ffn_size == 0:
            object.__setattr__(self, "ffn_size", 4 * self.hidden_size)


@dataclass(frozen=True, kw_only=True)
class GPTConfig(_TransformerConfig):
    """A decoder-only causal LM; the LM head shares the token embedding by default."""

    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"GPTConfig.tie_embeddings = {self.tie_embeddings!r} is invalid: "
                             "expected True or False")


@dataclass(frozen=True, kw_only=True)
class BertConfig(_TransformerConfig):
    """A bidirectional encoder with a masked-LM head."""

    type_vocab_size: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(type(self).__name__, "type_vocab_size", self.type_vocab_size)


ModelConfig = GPTConfig | BertConfig


def _validate(config: _TransformerConfig) -> None:
    owner = type(config).__name__
    for name in ("num_layers", "hidden_size", "num_heads", "vocab_size", "seq_len"):
        _positive(owner, name, getattr(config, name))
    if type(config.ffn_size) is not int or config.ffn_size < 0:
        raise ValueError(f"{owner}.ffn_size = {config.ffn_size!r} is invalid: expected an int >= 1, "
                         "or 0 for 4 × hidden_size")
    if config.hidden_size % config.num_heads:
        raise ValueError(
            f"{owner}.hidden_size = {config.hidden_size} is not divisible by num_heads = "
            f"{config.num_heads}; choose a hidden_size that is a multiple of num_heads"
        )
    dropout = config.dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}.dropout = {config.dropout!r} is invalid: expected 0 <= dropout < 1")


@dataclass(frozen=True)
class Entry:
    """One named configuration: its family ("gpt" or "bert"), fields and description."""

    family: str
    fields: dict[str, Any]
    description: str


def _gpt(layers: int, h: int, heads: int, vocab: int, seq: int, text: str) -> Entry:
    shape = dict(num_layers=layers, hidden_size=h, num_heads=heads, vocab_size=vocab, seq_len=seq)
    return Entry("gpt", shape, text)


_GPT3 = "GPT-3 (Brown et al. 2020, Table 2.1)"
_MEGATRON = "Megatron-LM weak scaling (Narayanan et al. SC'21, Table 1)"

REGISTRY: dict[str, Entry] = {
    "gpt": Entry("gpt", {}, "a GPT whose shape comes from the overrides (default: tiny)"),
    "bert": Entry("bert", {}, "a BERT whose shape comes from the overrides (default: tiny)"),
    "gpt-tiny": _gpt(2, 64, 4, 128, 32, "tiny GPT for tests and the demo"),
    "gpt-demo": _gpt(4, 128, 4, 4096, 128, "small code GPT that `autopar demo` trains on the standard "
                                           "library (a few minutes on 4 CPU processes)"),
    "bert-tiny": Entry("bert", dict(num_layers=2, hidden_size=64, num_heads=4, vocab_size=128,
                                    seq_len=32), "tiny BERT for tests"),
    "gpt2": _gpt(12, 768, 12, 50257, 1024, "GPT-2 small, 124M (Radford et al. 2019)"),
    "gpt2-medium": _gpt(24, 1024, 16, 50257, 1024, "GPT-2 medium, 355M"),
    "gpt2-large": _gpt(36, 1280, 20, 50257, 1024, "GPT-2 large, 774M"),
    "gpt2-xl": _gpt(48, 1600, 25, 50257, 1024, "GPT-2 XL, 1.5B"),
    "bert-base": Entry("bert", dict(num_layers=12, hidden_size=768, num_heads=12, vocab_size=30522,
                                    seq_len=512), "BERT-base, 110M (Devlin et al. 2019)"),
    "bert-large": Entry("bert", dict(num_layers=24, hidden_size=1024, num_heads=16, vocab_size=30522,
                                     seq_len=512), "BERT-large, 340M (Devlin et al. 2019)"),
    "gpt3-125m": _gpt(12, 768, 12, 50257, 2048, f"{_GPT3} Small"),
    "gpt3-350m": _gpt(24, 1024, 16, 50257, 2048, f"{_GPT3} Medium"),
    "gpt3-760m": _gpt(24, 1536, 16, 50257, 2048, f"{_GPT3} Large"),
    "gpt3-1.3b": _gpt(24, 2048, 16, 50257, 2048, f"{_GPT3} XL (paper: 24 heads of 128; 16 here "
                                                  "so that heads divide h)"),
    "gpt3-2.7b": _gpt(32, 2560, 32, 50257, 2048, f"{_GPT3} 2.7B"),
    "gpt3-6.7b": _gpt(32, 4096, 32, 50257, 2048, f"{_GPT3} 6.7B"),
    "gpt3-13b": _gpt(40, 5120, 40, 50257, 2048, f"{_GPT3} 13B (paper lists d_model 5140; 5120 = "
                                                 "40 heads × 128)"),
    "gpt3-175b": _gpt(96, 12288, 96, 50257, 2048, f"{_GPT3} 175B"),
    "megatron-1.7b": _gpt(24, 2304, 24, 51200, 2048, f"{_MEGATRON}, 1.7B"),
    "megatron-3.6b": _gpt(30, 3072, 32, 51200, 2048, f"{_MEGATRON}, 3.6B"),
    "megatron-7.5b": _gpt(36, 4096, 32, 51200, 2048, f"{_MEGATRON}, 7.5B"),
    "megatron-18b": _gpt(40, 6144, 48, 51200, 2048, f"{_MEGATRON}, 18.4B"),
    "megatron-39b": _gpt(48, 8192, 64, 51200, 2048, f"{_MEGATRON}, 39.1B"),
    "megatron-76b": _gpt(60, 10240, 80, 51200, 2048, f"{_MEGATRON}, 76.1B"),
    "megatron-145b": _gpt(80, 12288, 96, 51200, 2048, f"{_MEGATRON}, 145.6B"),
    "megatron-310b": _gpt(96, 16384, 128, 51200, 2048, f"{_MEGATRON}, 310.1B"),
    "megatron-530b": _gpt(105, 20480, 128, 51200, 2048, f"{_MEGATRON}, 529.6B"),
    "megatron-1t": _gpt(128, 25600, 160, 51200, 2048, f"{_MEGATRON}, 1008B"),
}

FAMILIES: dict[str, type] = {"gpt": GPTConfig, "bert": BertConfig}


def list_models() -> list[tuple[str, str]]:
    """Every zoo name with its one-line description."""
    return [(name, entry.description) for name, entry in REGISTRY.items()]


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The named configuration with ``overrides`` applied (validated)."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    cls = FAMILIES[entry.family]
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(f"{name!r} has no field(s) {unknown}; valid fields: {valid}")
    return cls(**{**entry.fields, **overrides})

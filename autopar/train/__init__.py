"""The trainer, imported as ``autopar.train``: train a model on a folder of text, on one process, on N
local processes, or under torchrun on one node or many.

Data flow: :class:`TrainConfig` (Python, a TOML file or ``autopar train`` flags) → :func:`train`
(``autopar.train.launch``: spawn, join torchrun's group, or run here) → ``autopar.train.loop`` on every
rank: corpus → tokenizer → model → ``autopar.compile`` (the plan) → per-rank ``TokenLoader`` →
steps, held-out loss, ``OUT/metrics.jsonl``/``.csv``, checkpoints (``autopar.train.checkpoints``) →
:class:`TrainResult`.

Layer: beside ``views`` and ``calibration``, above ``compile``; ``cli`` (``autopar train``) is above it.
"""

from autopar.train.config import TrainConfig
from autopar.train.launch import train
from autopar.train.loop import TrainResult

__all__ = ["TrainConfig", "TrainResult", "train"]

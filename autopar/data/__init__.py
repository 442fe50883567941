"""Data-side efficiency tools, imported as ``autopar.data``: curriculum learning and fill-in-the-middle.

Data flow: a dataset → (optional) :class:`CurriculumSampler` over a :class:`DifficultyIndex`, or
:func:`truncate_batch` at ``pacing(step)`` tokens; documents → (optional) :class:`FIMTransform` →
``torch.utils.data.DataLoader`` → training. Nothing here is on unless built; graph-side data
efficiency (random layerwise token dropping) is the ``autopar.passes.RandomLTD`` pass.

Layer: beside ``plans``, ``models`` and ``hf``; imports nothing of autopar.
"""

from autopar.data.curriculum import (
    CurriculumSampler,
    DifficultyIndex,
    Pacing,
    sequence_length,
    token_counts,
    truncate_batch,
    vocabulary_rarity,
)
from autopar.data.fim import FIMConfig, FIMTransform, undo_fim

__all__ = [
    "CurriculumSampler", "DifficultyIndex", "FIMConfig", "FIMTransform", "Pacing", "sequence_length",
    "token_counts", "truncate_batch", "undo_fim", "vocabulary_rarity",
]

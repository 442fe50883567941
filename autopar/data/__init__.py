"""Training data, imported as ``autopar.data``: a corpus from any folder, a locally trained BPE
tokenizer, per-rank token batches, and the data-side efficiency tools (curriculum, fill-in-the-middle).

Data flow: a folder of text or source files → :meth:`Corpus.from_folder` (or :func:`stdlib_corpus`),
split into train and held-out by file → :func:`train_tokenizer` on the train split (cached JSON) →
:func:`token_stream` per split: documents → (optional) :class:`FIMTransform` → packed with an
end-of-text id (cached ``.npy``) → :class:`TokenLoader`: this rank's rows of each global batch as a
:class:`Batch` (shuffled per epoch, or drawn by a :class:`CurriculumSampler` over a
:class:`DifficultyIndex` of its :class:`TokenWindows`; cut to ``pacing(step)`` tokens by
:func:`truncate_batch`), and :meth:`TokenLoader.eval_batches` over the held-out split → training and
held-out loss. Nothing here downloads anything; graph-side data efficiency (random layerwise token
dropping) is the ``autopar.passes.RandomLTD`` pass.

Layer: beside ``plans``, ``models`` and ``hf``; imports nothing of autopar.
"""

__all__ = [
    "CurriculumSampler", "DifficultyIndex", "FIMConfig", "FIMTransform", "Pacing", "sequence_length",
    "token_counts", "truncate_batch", "undo_fim", "vocabulary_rarity",
    "Batch", "BPETokenizer", "Corpus", "CorpusFile", "TokenLoader", "TokenStream", "TokenWindows",
    "stdlib_corpus", "token_stream", "train_tokenizer",
]

from autopar.data.corpus import Corpus, CorpusFile, stdlib_corpus
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
from autopar.data.loader import Batch, TokenLoader, TokenWindows
from autopar.data.stream import TokenStream, token_stream
from autopar.data.tokenizer import BPETokenizer, train_tokenizer

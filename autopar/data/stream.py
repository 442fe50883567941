"""One split of a corpus as a flat token stream, cached on disk as a ``.npy`` file (never pickle).

Data flow: :class:`autopar.data.Corpus` split + :class:`autopar.data.BPETokenizer` →
:func:`token_stream` reads each file in path order (binary or non-UTF-8 files are skipped,
counted and logged), tokenizes it, applies fill-in-the-middle to document ``i`` when asked
(:class:`autopar.data.FIMTransform` at token level with the tokenizer's sentinel ids, chosen by
(``fim_seed``, ``i``)), appends the end-of-text id, and concatenates → ``tokens-<key>.npy``
(uint16 when the vocabulary fits, else int32) beside a JSON record of its counts, both written
atomically → :class:`TokenStream`, memory-mapped → windows served by :class:`autopar.data.TokenLoader`.

The key covers the split's fingerprint (file list, sizes, mtimes), the tokenizer file's hash and
the FIM settings; processes on one machine build a missing stream once (a file lock) and reuse it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autopar.data._files import build_lock, cache_folder, content_key, write_atomic
from autopar.data.corpus import Corpus, Split
from autopar.data.fim import FIMConfig, FIMTransform
from autopar.data.tokenizer import BPETokenizer

FORMAT_VERSION = 1
ENCODE_CHUNK = 64  # documents per encode_batch call
log = logging.getLogger("autopar.data")


@dataclass(frozen=True)
class TokenStream:
    """A split's documents, tokenized and packed: ``tokens`` is 1-D, each document ends in ``eot_id``."""

    tokens: np.ndarray
    split: Split
    key: str
    path: Path
    num_documents: int
    num_skipped: int
    eot_id: int

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def describe(self) -> str:
        skipped = f", {self.num_skipped} skipped (binary or not UTF-8)" if self.num_skipped else ""
        return f"{self.split}: {self.num_documents} documents{skipped}, {self.num_tokens:,} tokens"


def _fim(tokenizer: BPETokenizer, rate: float, spm_rate: float, seed: int) -> FIMTransform | None:
    if rate == 0:
        return None
    return FIMTransform(FIMConfig(rate=rate, spm_rate=spm_rate, level="token", seed=seed,
                                  prefix=tokenizer.fim_prefix_id, suffix=tokenizer.fim_suffix_id,
                                  middle=tokenizer.fim_middle_id))


def _tokenize(corpus: Corpus, tokenizer: BPETokenizer, split: Split, fim: FIMTransform | None
              ) -> tuple[np.ndarray, int, list[str]]:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    files = corpus.files(split)
    pieces, skipped, num_documents = [], [], 0
    for start in range(0, len(files), ENCODE_CHUNK):
        chunk = [(index, file, corpus.read(file))
                 for index, file in enumerate(files[start:start + ENCODE_CHUNK], start)]
        skipped += [file.path for _, file, text in chunk if text is None]
        documents = [(index, text) for index, _, text in chunk if text is not None]
        for (index, _), ids in zip(documents, tokenizer.encode_batch([t for _, t in documents]), strict=True):
            if fim is not None:
                ids = fim(ids, index)
            pieces.append(np.asarray(ids + [tokenizer.eot_id], dtype=dtype))
        num_documents += len(documents)
    if not pieces:
        raise ValueError(f"the {split} split of {str(corpus.root)!r} has no UTF-8 text files ({len(skipped)} "
                         "binary or undecodable): point the corpus at a folder of text or source files")
    return np.concatenate(pieces), num_documents, skipped


def _save(path: Path, record_path: Path, tokens: np.ndarray, record: dict) -> None:
    write_atomic(path, lambda file: np.save(file, tokens, allow_pickle=False))
    write_atomic(record_path, lambda file: file.write(json.dumps(record, indent=1).encode("utf-8")))


def _load(path: Path, record_path: Path, split: Split, key: str, eot_id: int) -> TokenStream | None:
    if not (path.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):  # a corrupt file: rebuild it
        return None
    if not isinstance(record, dict) or record.get("key") != key or tokens.ndim != 1 \
            or tokens.shape[0] != record.get("num_tokens"):
        return None  # a foreign or mismatched pair: rebuild
    return TokenStream(tokens, split, key, path, int(record["num_documents"]), int(record["num_skipped"]),
                       eot_id)


def token_stream(corpus: Corpus, tokenizer: BPETokenizer, *, split: Split, fim_rate: float = 0.0,
                 fim_spm_rate: float = 0.5, fim_seed: int = 0,
                 cache_dir: str | os.PathLike[str] | None = None) -> TokenStream:
    """The ``split`` of ``corpus`` tokenized by ``tokenizer`` (with FIM at ``fim_rate``), built once
    and cached in ``cache_dir`` (default ``~/.cache/autopar/data``)."""
    fim = _fim(tokenizer, fim_rate, fim_spm_rate, fim_seed)
    fim_key = None if fim is None else [fim.config.rate, fim.config.spm_rate, fim.config.seed]
    key = content_key({"format": FORMAT_VERSION, "corpus": corpus.fingerprint(split),
                       "tokenizer": tokenizer.digest, "fim": fim_key})
    path = cache_folder(cache_dir) / f"tokens-{split}-{key[:20]}.npy"
    record_path = path.with_suffix(".json")
    with build_lock(path):
        stream = _load(path, record_path, split, key, tokenizer.eot_id)
        if stream is not None:
            return stream
        tokens, num_documents, skipped = _tokenize(corpus, tokenizer, split, fim)
        if skipped:
            log.warning("skipped %d of %d files in the %s split of %s (binary or not UTF-8), e.g. %s",
                        len(skipped), len(corpus.files(split)), split, corpus.root, skipped[0])
        _save(path, record_path, tokens, {"format": FORMAT_VERSION, "key": key, "split": split,
                                          "num_tokens": int(tokens.shape[0]), "num_documents": num_documents,
                                          "num_skipped": len(skipped), "skipped": skipped[:100]})
        stream = _load(path, record_path, split, key, tokenizer.eot_id)
    assert stream is not None
    return stream

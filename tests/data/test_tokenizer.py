"""The local BPE tokenizer: exact round trip on source text, special tokens, the deterministic
training sample, and the cache (a second construction loads the file instead of training)."""

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from autopar.data import BPETokenizer, Corpus, train_tokenizer
from autopar.data.tokenizer import SPECIAL_TOKENS, training_sample
from tests.data.generated import write_corpus

SOURCE = 'def f(x):\n\treturn {"ünï": x, "emoji": "😀"}  # <|endoftext|> stays text\r\n\n'


def test_round_trip_on_source_text(corpus, tokenizer):
    assert tokenizer.trained and tokenizer.vocab_size == 512
    assert [tokenizer.eot_id, tokenizer.fim_prefix_id, tokenizer.fim_suffix_id,
            tokenizer.fim_middle_id] == [0, 1, 2, 3]
    ids = tokenizer.encode(SOURCE)
    assert tokenizer.decode(ids) == SOURCE and 0 not in ids  # the spelled-out token is not the EOT id
    texts = [corpus.read(file) for file in corpus.train if file.path.endswith(".py")]
    encoded = tokenizer.encode_batch(texts)
    assert [tokenizer.decode(ids) for ids in encoded] == texts
    assert sum(map(len, encoded)) < sum(len(t.encode()) for t in texts) / 2  # the learned merges compress
    assert tokenizer.encode_batch([SOURCE, "x"]) == [tokenizer.encode(SOURCE), tokenizer.encode("x")]
    assert tokenizer.decode([tokenizer.eot_id]) == SPECIAL_TOKENS[0]


def test_second_construction_loads_the_cached_file(corpus, tokenizer, cache_dir):
    mtime = os.stat(tokenizer.path).st_mtime_ns
    again = train_tokenizer(corpus, vocab_size=512, cache_dir=cache_dir)
    assert not again.trained and again.path == tokenizer.path and again.digest == tokenizer.digest
    assert os.stat(tokenizer.path).st_mtime_ns == mtime
    assert again.encode(SOURCE) == tokenizer.encode(SOURCE)
    loaded = BPETokenizer.load(tokenizer.path)
    assert loaded.encode(SOURCE) == tokenizer.encode(SOURCE) and not loaded.trained
    other = train_tokenizer(corpus, vocab_size=400, cache_dir=cache_dir)
    assert other.trained and other.path != tokenizer.path and other.vocab_size == 400
    assert sorted(p.name for p in cache_dir.glob("tokenizer-*.json")) == sorted(
        p.name for p in (tokenizer.path, other.path))  # no temp file left behind


def test_a_changed_corpus_trains_again(tmp_path):
    write_corpus(tmp_path / "corpus", num_files=6)
    corpus = Corpus.from_folder(tmp_path / "corpus")
    first = train_tokenizer(corpus, vocab_size=300, cache_dir=tmp_path / "cache")
    with open(corpus.root / corpus.train[0].path, "a") as file:
        file.write("extra = 1\n")
    changed = Corpus.from_folder(tmp_path / "corpus")
    assert changed.fingerprint("train") != corpus.fingerprint("train")
    second = train_tokenizer(changed, vocab_size=300, cache_dir=tmp_path / "cache")
    assert second.trained and second.path != first.path
    (corpus.root / changed.heldout[0].path).write_text("held-out files do not train the tokenizer\n")
    third = train_tokenizer(Corpus.from_folder(tmp_path / "corpus"), vocab_size=300,
                            cache_dir=tmp_path / "cache")
    assert not third.trained and third.path == second.path


def test_training_sample_is_bounded_and_deterministic(corpus):
    sample = training_sample(corpus, 5_000)
    assert sum(len(t.encode()) for t in sample) <= 5_000 and len(sample) >= 2
    assert sample == training_sample(corpus, 5_000)
    assert sum(len(t.encode()) for t in training_sample(corpus, 10**9)) == sum(
        len(corpus.read(f).encode()) for f in corpus.train if corpus.read(f) is not None)


def test_bad_settings_and_missing_file(corpus, tmp_path):
    with pytest.raises(ValueError, match="vocab_size = 100 is invalid: expected an int >= 260"):
        train_tokenizer(corpus, vocab_size=100, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="max_train_bytes = 0 is invalid"):
        train_tokenizer(corpus, max_train_bytes=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="does not exist: train one with"):
        BPETokenizer.load(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="is a file: pass a folder"):
        train_tokenizer(corpus, cache_dir=corpus.root / "README.md")


def test_concurrent_builders_train_once_and_a_corrupt_file_is_replaced(corpus, tmp_path):
    def build(_):  # each call opens its own lock file description, as separate processes do
        return train_tokenizer(corpus, vocab_size=300, cache_dir=tmp_path)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(build, range(3)))
    assert sorted(r.trained for r in results) == [False, False, True]
    assert len({r.digest for r in results}) == 1
    results[0].path.write_text("{not json")
    with pytest.raises(ValueError, match="is corrupt .* delete it and train again"):
        BPETokenizer.load(results[0].path)
    assert build(0).trained and BPETokenizer.load(results[0].path).digest == results[0].digest


def test_missing_tokenizers_package_names_the_extra(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # what `import tokenizers` sees when absent
    with pytest.raises(ImportError, match=r"needs the `tokenizers` package: pip install 'autopar\[hf\]'"):
        train_tokenizer(corpus, cache_dir=tmp_path)

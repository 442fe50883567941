"""Fixtures for the corpus, tokenizer and loader tests: a small folder of generated source files
(about 90 KB, the same every run) and one tokenizer trained on it per test session."""

import pytest

from autopar.data import Corpus, train_tokenizer
from tests.data.generated import write_corpus


@pytest.fixture(scope="session")
def corpus_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder)
    return folder


@pytest.fixture(scope="session")
def corpus(corpus_folder):
    return Corpus.from_folder(corpus_folder, heldout_fraction=0.15)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tokenizer(corpus, cache_dir):
    return train_tokenizer(corpus, vocab_size=512, cache_dir=cache_dir)

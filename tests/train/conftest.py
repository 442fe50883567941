"""Fixtures for the trainer tests: the generated corpus folder of the data tests (about 90 KB of small
Python modules), a tokenizer cache shared by the session, and the tiny settings every run uses."""

import pytest

from tests.data.generated import write_corpus

TINY = ["--model", "gpt-tiny", "--seq-len", "16", "--vocab-size", "300", "--global-batch-size", "4",
        "--eval-batches", "1", "--log-interval", "1", "--plan-time-limit-s", "10"]


@pytest.fixture(scope="session")
def corpus_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder)
    return folder


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")

"""Fixtures for the trainer tests: the data tests' generated corpus folder (about 90 KB of small Python
modules) and tokenizer cache, and the tiny settings every run uses."""

from tests.data.conftest import cache_dir, corpus_folder  # noqa: F401 - fixtures shared with the data tests

TINY = ["--model", "gpt-tiny", "--seq-len", "16", "--vocab-size", "300", "--global-batch-size", "4",
        "--eval-batches", "1", "--log-interval", "1", "--plan-time-limit-s", "10"]

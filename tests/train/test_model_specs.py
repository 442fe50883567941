"""``autopar train`` takes every kind of MODEL: a Hugging Face config file and ``module:factory``
(a zoo name is in the other tests), each trained one step on one process, held-out loss reported."""

import json

import pytest

from tests.helpers.cli import run_cli
from tests.train.conftest import TINY

FACTORY = '''
import torch
from torch import nn


class Bigram(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(320, 16)
        self.head = nn.Linear(16, 320)

    def forward(self, ids):
        return self.head(self.embed(ids))


def build():
    return Bigram(), (torch.zeros(2, 16, dtype=torch.long),)
'''


def _train(capfd, tmp_path, corpus_folder, cache_dir, model):
    args = [*TINY[2:], "--model", model, "--corpus", str(corpus_folder), "--out", str(tmp_path / "out"),
            "--cache-dir", str(cache_dir), "--steps", "1"]
    code, stdout, err = run_cli(capfd, "train", *args)
    assert code == 0, err
    assert "trained steps 0 → 1" in stdout and "held-out loss" in stdout, stdout
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 1 and "eval_loss" in row


def test_hugging_face_config(capfd, tmp_path, corpus_folder, cache_dir):
    pytest.importorskip("transformers")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 1,
                                  "n_embd": 32, "n_head": 2, "vocab_size": 320, "n_positions": 32,
                                  "eos_token_id": 0, "bos_token_id": 0}))
    _train(capfd, tmp_path, corpus_folder, cache_dir, str(config))


def test_module_factory(capfd, tmp_path, corpus_folder, cache_dir, monkeypatch):
    (tmp_path / "bigram_model.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    _train(capfd, tmp_path, corpus_folder, cache_dir, "bigram_model:build")

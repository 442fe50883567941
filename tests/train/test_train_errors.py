"""Bad inputs to ``autopar train`` give one line of error and exit code 2, and nothing already written
is lost: a missing corpus folder, a sequence longer than the model's, a batch that does not divide
over dp × cp, a corrupt checkpoint, a checkpoint of another model, a checkpoint without trainer
state. One process trains (``--nproc 1``): the same loop as N ranks, on the one-device executor."""

import shutil

import pytest
import torch

import autopar
from tests.helpers.cli import run_cli
from tests.train.conftest import TINY


def _train(capfd, out, corpus, cache, *extra):
    return run_cli(capfd, "train", *TINY, "--corpus", str(corpus), "--out", str(out), "--cache-dir",
                   str(cache), "--nproc", "1", *extra)


def _one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()  # the data loader may log a line before (files it skipped)
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert errors == [lines[-1]] and lines[-1].startswith("autopar: error:"), err
    for needle in needles:
        assert needle in lines[-1], lines[-1]


@pytest.mark.parametrize(("flags", "needles"), [
    (["--seq-len", "64"], ["seq_len = 64 is longer than model 'gpt-tiny' takes (32 positions)"]),
    (["--fix", "dp=3", "--nproc", "3"], ["global_batch_size = 4 does not divide over dp(3) × cp(1)"]),
    (["--fix", "cp=2", "--seq-len", "15"], ["seq_len = 15 does not divide over cp(2)"]),
])
def test_bad_settings(capfd, tmp_path, corpus_folder, cache_dir, flags, needles):
    code, _, err = _train(capfd, tmp_path / "out", corpus_folder, cache_dir, "--steps", "1", *flags)
    _one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()


def test_missing_corpus_folder(capfd, tmp_path, cache_dir):
    code, _, err = _train(capfd, tmp_path / "out", tmp_path / "nowhere", cache_dir, "--steps", "1")
    _one_line_error(code, err, "corpus folder", "does not exist")


def test_bad_checkpoints_are_refused_and_kept(capfd, tmp_path, corpus_folder, cache_dir):
    out = tmp_path / "out"
    code, stdout, err = _train(capfd, out, corpus_folder, cache_dir, "--steps", "2", "--checkpoint-interval",
                               "1", "--eval-interval", "2")
    assert code == 0, err
    assert "held-out loss" in stdout and "checkpoint" in stdout
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_00000001", "step_00000002"]
    metrics = (out / "metrics.jsonl").read_text()

    code, _, err = _train(capfd, out, corpus_folder, cache_dir, "--steps", "3", "--vocab-size", "400")
    _one_line_error(code, err, "cannot resume from", "step_00000002", "was saved with shape")

    autopar_saved = tmp_path / "plain"
    compiled = autopar.compile(autopar.models.build("gpt-tiny", vocab_size=300))
    torch.optim.lr_scheduler.LambdaLR(compiled.optimizer, lambda step: 1.0)  # the trainer's hyperparameters
    compiled.step(torch.zeros(4, 16, dtype=torch.long), torch.zeros(4, 16, dtype=torch.long))
    autopar.save(compiled, autopar_saved)
    shutil.copytree(autopar_saved, out / "checkpoints" / "step_00000003")
    code, _, err = _train(capfd, out, corpus_folder, cache_dir, "--steps", "4")
    _one_line_error(code, err, "step_00000003", "holds no autopar trainer state")
    shutil.rmtree(out / "checkpoints" / "step_00000003")

    (out / "checkpoints" / "step_00000002" / ".metadata").write_bytes(b"not a checkpoint")
    code, _, err = _train(capfd, out, corpus_folder, cache_dir, "--steps", "3")
    _one_line_error(code, err, "cannot resume from", "step_00000002", "not a complete checkpoint")
    assert (out / "metrics.jsonl").read_text() == metrics, "a failed resume keeps the metrics"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints

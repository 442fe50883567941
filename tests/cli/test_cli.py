"""The autopar console script: capture, demo, and one-line errors with exit code 2."""

import argparse
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from autopar.cli.main import main
from autopar.data import Corpus, TokenLoader, train_tokenizer
from tests.data.generated import write_corpus
from tests.helpers.cli import parse_passes


def run(capsys, *argv):
    code = main(["--no-color", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_console_script_is_installed():
    exe = shutil.which("autopar") or str(__import__("pathlib").Path(sys.executable).parent / "autopar")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("capture", "demo"):
        assert command in result.stdout


def test_capture_zoo_model(capsys):
    code, out, err = run(capsys, "capture", "gpt-tiny", "--batch", "2", "--seq", "16")
    assert code == 0, err
    assert "parameters" in out and "FLOPs per step" in out
    assert "repeated layers" in out and "largest activations" in out
    assert "0–1" in out  # two identical layers folded into one row


def test_capture_large_model_on_meta(capsys):
    code, out, err = run(capsys, "capture", "gpt3-175b", "--seq", "2048")
    assert code == 0, err
    assert "0–95" in out and "174.6 G" in out


def test_capture_hf_config(tmp_path, capsys):
    pytest.importorskip("transformers")
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 3,
              "n_embd": 64, "n_head": 4, "vocab_size": 256, "n_positions": 64}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code, out, err = run(capsys, "capture", str(path), "--seq", "32")
    assert code == 0, err
    assert "export" in out and "0–2" in out


def test_capture_module_callable(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def mlp():
            model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
            return model, (torch.randn(4, 8),)

        def bare():
            return nn.Linear(2, 2)

        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 4)

            def forward(self, x):
                if self.lin(x).sum() > 0:
                    return x
                return -x

        def branchy():
            return Branchy(), torch.randn(2, 4)

        def not_a_model():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run(capsys, "capture", "my_models:mlp")
    assert code == 0, err
    assert "parameters" in out
    for spec, message in [
        ("my_models:bare", "does not know what Linear takes as input"),
        ("my_models:branchy", "could not capture Branchy"),
        ("my_models:not_a_model", "returned int"),
        ("my_models:missing", "has no callable 'missing'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ]:
        code, out, err = run(capsys, "capture", spec)
        assert code == 2, (spec, out, err)
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["capture", "gpt-nonexistent"], "gpt-nonexistent"),
    (["capture", "gpt-tiny", "--batch", "0"], "batch size must be >= 1"),
    (["capture", "gpt-tiny", "--seq", "0"], "sequence length must be >= 1"),
    (["capture", "gpt-tiny", "--seq", "100000"], "100000"),
    (["capture", "/no/such/dir/config.json"], "no Hugging Face config"),
    (["demo", "--steps", "0"], "--steps must be >= 1"),
])
def test_user_errors_are_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err and err.startswith("autopar: error:") and err.count("\n") == 1


def test_bad_config_files(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    code, _, err = run(capsys, "capture", str(broken))
    assert code == 2 and "is not valid JSON" in err
    no_type = tmp_path / "config.json"
    no_type.write_text(json.dumps({"hidden_size": 4}))
    code, _, err = run(capsys, "capture", str(no_type))
    assert code == 2 and "no 'model_type'" in err


def test_debug_shows_traceback(capsys):
    with pytest.raises(ValueError):
        main(["--debug", "capture", "gpt-nonexistent"])


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_demo_trains_and_loss_falls(capfd, tmp_path, monkeypatch):
    """Issue 19 item 3 on a small generated corpus: 4 local processes with the plan the planner
    chooses (shown), the curve, held-out loss before and after (falling), tokens/s, the measured
    report beside the predictions (time by phase, memory by category, a row per rank) and the
    parity line. The ranks print to the terminal, hence capfd."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus, num_files=300)
    monkeypatch.setenv("AUTOPAR_DATA_CACHE", str(tmp_path / "cache"))
    code, out, err = run(capfd, "demo", "--steps", "4", "--batch", "8", "--corpus", str(corpus),
                         "--out", str(tmp_path / "out"))
    assert code == 0, err + out
    before, after = map(float, re.search(r"held-out loss falls: ([\d.]+) before training → ([\d.]+) after 4 "
                                         r"steps", out).groups())
    assert after < before
    assert "the plan the planner chose: dp" in out and "pipeline stages" in out
    assert "tokens/s" in out and "step time: measured" in out and "predicted" in out
    assert re.search(r"first 4 steps equal one process \(plain PyTorch.*max \|Δloss\| \S+ \(equal", out), out
    assert "DIFFERENT" not in out
    assert "step time by phase" in out and "memory by category" in out
    memory = [line.split() for line in out.splitlines() if line.split()[1:2] == ["parameters"]]
    assert [words[0] for words in memory] == ["0", "1", "2", "3"], out  # each rank's first memory row
    assert (tmp_path / "out" / "metrics.jsonl").exists()
    _readme_describes_the_demo(out)


def test_demo_refuses_an_earlier_run(capfd, tmp_path):
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    code, out, err = run(capfd, "demo", "--out", str(tmp_path))
    assert code == 2 and "already holds a training run" in err and err.count("\n") == 1, err


def test_demo_config_carries_the_pass_options_to_the_ranks():
    """The demo hands ``--random-ltd``/``--moe`` to the trainer as TrainConfig.passes, which travel to
    the spawned ranks as JSON and come back as the same ``autopar.passes`` objects; nothing pinned."""
    from autopar.cli.demo import demo_config
    from autopar.train import TrainConfig

    passes = parse_passes("--random-ltd", "min_tokens=32,num_steps=100,layers=1-2", "--moe", "num_experts=4")
    args = argparse.Namespace(steps=300, nproc=4, corpus="stdlib", batch=16, seed=0)
    config = demo_config(args, "out", passes)
    again = TrainConfig.from_json(config.to_json())
    assert again.graph_passes == config.graph_passes == passes
    assert config.report and config.fix == {} and config.model == "gpt-demo"
    with pytest.raises(ValueError, match="unknown pass 'nope'"):
        TrainConfig.from_mapping({"model": "gpt-demo", "corpus": "stdlib", "out": "o", "steps": 1,
                                  "passes": '[{"name": "nope"}]'})


def test_demo_reference_reads_the_ranks_rows(tmp_path):
    """The parity reference reads the global batch with one loader (dp 1): the union of the
    data-parallel ranks' rows, in rank order, for every step."""
    write_corpus(tmp_path / "corpus", num_files=40)
    corpus = Corpus.from_folder(tmp_path / "corpus", heldout_fraction=0.15)
    tokenizer = train_tokenizer(corpus, vocab_size=512, cache_dir=tmp_path / "cache")
    geometry = {"global_batch_size": 8, "seq_len": 16, "seed": 3, "cache_dir": tmp_path / "cache"}
    whole = TokenLoader(corpus, tokenizer, **geometry)
    for dp in (2, 4):
        ranks = [TokenLoader(corpus, tokenizer, dp_degree=dp, dp_rank=r, **geometry) for r in range(dp)]
        for step in range(3):
            whole.step = step
            expected = next(whole).tokens
            assert torch.equal(torch.cat([next(loader).tokens for loader in ranks]), expected)


def _readme_describes_the_demo(out: str) -> None:
    """Issue 16 item 13, issue 19 item 3: the README's Quick start says what the demo does."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    quick = readme[readme.index("## Quick start"):readme.index("## Python API")]
    line = next(line for line in quick.splitlines() if line.startswith("make demo"))
    processes = re.search(r"on (\d+) local processes", line)
    assert processes and "standard library" in line and "held-out loss" in quick, quick
    assert f"on {processes.group(1)} local CPU processes" in out, out[:400]
    command = next(line for line in readme.splitlines() if line.startswith("autopar demo "))
    assert "planner" in command and "held-out" in command, command
    assert "the plan the planner chose" in out and "held-out loss" in out


def test_hf_config_without_seq_uses_the_models_context_length(tmp_path):
    """Like a zoo model's own seq_len: an HF config's n_positions / max_position_embeddings."""
    pytest.importorskip("transformers")
    from autopar.model_source import resolve

    for key, kind in (("n_positions", "gpt2"), ("max_position_embeddings", "llama")):
        config = {"model_type": kind, "vocab_size": 256, key: 48, "hidden_size": 32, "n_embd": 32,
                  "num_attention_heads": 4, "n_head": 4, "num_hidden_layers": 1, "n_layer": 1,
                  "intermediate_size": 64}
        path = tmp_path / f"{kind}.json"
        path.write_text(json.dumps(config))
        assert resolve(str(path), batch_size=2, seq_len=None).args[0].shape == (2, 48)
        assert resolve(str(path), batch_size=2, seq_len=16).args[0].shape == (2, 16)

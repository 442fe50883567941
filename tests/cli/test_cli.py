"""The autopar console script: capture, demo, and one-line errors with exit code 2."""

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autopar.cli.main import main


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


def test_demo_trains_and_loss_falls(capfd):
    """4 local processes (pp2 × tp2): the loss falls, equals the single-process reference, and the
    measured report has a row per rank. The ranks print to the terminal, hence capfd."""
    code, out, err = run(capfd, "demo", "--steps", "5")
    assert code == 0, err
    steps = [line.split() for line in out.splitlines() if line.startswith("step")]
    losses = [float(words[3]) for words in steps]
    references = [float(words[5]) for words in steps]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert losses == pytest.approx(references, rel=1e-5)
    assert "single-process reference" in out and "(equal" in out and "DIFFERENT" not in out
    assert "pp2 × dp1 × tp2" in out and "predicted" in out
    rows = [line for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"], ["3"])]
    timing = [row for row in rows if "parameters" not in row]
    memory = [row for row in rows if "parameters" in row]  # each rank's first memory-by-category row
    assert len(timing) == 4 and len(memory) == 4, out
    assert "memory by category" in out
    _readme_describes_the_demo(out)


def _readme_describes_the_demo(out: str) -> None:
    """Issue 16 item 13: the README's description of the demo is what the demo runs."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("autopar demo "))
    described = re.search(r"on (\d+) processes \(pp(\d+) × tp(\d+), (\w+)\)", line)
    assert described, line
    processes, pp, tp, schedule = described.groups()
    assert f"on {processes} local CPU processes" in out, out[:300]
    assert f"pp{pp} × dp1 × tp{tp}, {schedule.lower()}" in out, out[:400]


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

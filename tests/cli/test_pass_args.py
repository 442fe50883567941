"""Graph-pass options (``--random-ltd``): parsing, one-line errors with exit code 2 in
``autopar run`` and ``autopar demo``, and the passes reaching the script's ``autopar.compile``."""

import argparse
import json
import textwrap

import pytest

from autopar.cli.main import main
from autopar.cli.pass_args import add_pass_arguments, passes_from_args
from autopar.passes import RandomLTD

SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    import torch

    import autopar

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    model = autopar.models.build("gpt-tiny", num_layers=4)
    inputs, targets = autopar.models.example_batch(model, batch_size=4, seq_len=16)
    compiled = autopar.compile(model, f"local:{world}", fix={"pp": 2, "num_microbatches": 2})
    compiled.step(inputs, targets)
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    (out / f"rank{rank}.json").write_text(json.dumps({
        "passes": [repr(p) for p in compiled.passes], "applied": compiled.passes_applied,
        "state": compiled.pass_state}))
""")


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_pass_arguments(parser)
    return passes_from_args(parser.parse_args(argv))


def test_random_ltd_values():
    assert _parse() == []
    assert _parse("--random-ltd", "min_tokens=128,num_steps=1000,granularity=16,layers=1-10") == [
        RandomLTD(min_tokens=128, num_steps=1000, granularity=16, layers=tuple(range(1, 11)))]
    assert _parse("--random-ltd", " num-steps = 5 , min_tokens=4,layers=1-2+4,seed=3") == [
        RandomLTD(min_tokens=4, num_steps=5, layers=(1, 2, 4), seed=3)]


@pytest.mark.parametrize(("value", "message"), [
    (None, "needs at least min_tokens and num_steps"),
    ("min_tokens=8", "num_steps missing"),
    ("min_tokens=x,num_steps=4", "min_tokens=x is not an integer"),
    ("min_tokens=8;num_steps=4", "is not an integer"),
    ("min_tokens=8,num_steps", "'num_steps' is not KEY=VALUE"),
    ("min_value=8,num_steps=4", "min_value is DeepSpeed's name; here it is min_tokens=8"),
    ("min_tokens=8,num_steps=4,keep=2", "unknown key 'keep'"),
    ("min_tokens=8,num_steps=4,min_tokens=2", "min_tokens is given twice"),
    ("min_tokens=8,num_steps=4,layers=3-1", "expected A-B with 0 <= A <= B"),
    ("min_tokens=8,num_steps=4,layers=1-3+2", "names a layer twice"),
    ("min_tokens=8,num_steps=4,layers=a", "inclusive ranges"),
    ("min_tokens=0,num_steps=4", "RandomLTD.min_tokens = 0 is invalid"),
])
def test_bad_values_exit_2_with_one_line(tmp_path, capfd, value, message):
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit('never run')\n")
    option = ["--random-ltd"] if value is None else ["--random-ltd", value]
    for argv in (["run", str(script), "--nproc", "2", *option], ["demo", *option]):
        code = main(["--no-color", *argv])
        out, err = capfd.readouterr()
        assert code == 2, (argv, out, err)
        assert err.count("\n") == 1 and err.startswith("autopar: error: --random-ltd"), err
        assert message in err, err


def test_run_hands_the_passes_to_the_script(tmp_path, capfd):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    code = main(["--no-color", "run", str(script), "--nproc", "2", "--random-ltd",
                 "min_tokens=4,num_steps=10,layers=1-2", "--", "--out", str(tmp_path)])
    out, err = capfd.readouterr()
    assert code == 0, err
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["passes"] == [repr(RandomLTD(min_tokens=4, num_steps=10, layers=(1, 2)))]
        assert result["applied"] == ["random_ltd"]
        assert result["state"]["random_ltd"]["step"] == 1

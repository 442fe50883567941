"""Graph-pass options (``--random-ltd``): parsing, one-line errors with exit code 2 in
``autopar run`` and ``autopar demo``, and the passes reaching the script's ``autopar.compile``."""

import textwrap

import pytest

from autopar.passes import RandomLTD
from tests.helpers.cli import assert_one_line_error, parse_passes, run_script

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


def test_random_ltd_values():
    assert parse_passes() == []
    assert parse_passes("--random-ltd", "min_tokens=128,num_steps=1000,granularity=16,layers=1-10") == [
        RandomLTD(min_tokens=128, num_steps=1000, granularity=16, layers=tuple(range(1, 11)))]
    assert parse_passes("--random-ltd", " num-steps = 5 , min_tokens=4,layers=1-2+4,seed=3") == [
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
    option = ["--random-ltd"] if value is None else ["--random-ltd", value]
    assert_one_line_error(capfd, tmp_path, option, message)


def test_run_hands_the_passes_to_the_script(tmp_path, capfd):
    results = run_script(capfd, tmp_path, SCRIPT, "--random-ltd", "min_tokens=4,num_steps=10,layers=1-2",
                         nproc=2)
    for result in results:
        assert result["passes"] == [repr(RandomLTD(min_tokens=4, num_steps=10, layers=(1, 2)))]
        assert result["applied"] == ["random_ltd"]
        assert result["state"]["random_ltd"]["step"] == 1

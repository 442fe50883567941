"""``--moe K=V,...``: parsing, one-line errors with exit code 2 in ``autopar plan``, ``run`` and
``demo``, planning an MoE model, and the pass reaching the script's ``autopar.compile``."""

import textwrap

import pytest

from autopar.passes import MoE, RandomLTD
from tests.helpers.cli import assert_one_line_error, parse_passes, run_cli, run_script

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import torch

    import autopar

    torch.manual_seed(0)
    model = autopar.models.build("gpt-tiny", num_layers=4)
    inputs, targets = autopar.models.example_batch(model, batch_size=2, seq_len=16)
    compiled = autopar.compile(model, "local:1")
    loss = compiled.step(inputs, targets)
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    (out / "rank0.json").write_text(json.dumps({
        "passes": [repr(p) for p in compiled.passes], "applied": compiled.passes_applied,
        "moe": sorted(compiled.moe), "loads": {k: v.tokens for k, v in compiled.moe_stats().items()}}))
""")


def test_moe_values():
    assert parse_passes("--moe") == [MoE()]
    assert parse_passes("--moe", "num_experts=8,top_k=2,layers=every_other,capacity_factor=1.25") == [MoE()]
    full = ("num_experts=4,top_k=1,layers=1;3,capacity_factor=2,eval_capacity_factor=3.5,upcycle=false,"
            "aux_loss_weight=0,z_loss_weight=1e-4,seed=7")
    assert parse_passes("--moe", full) == [MoE(num_experts=4, top_k=1, layers=(1, 3), capacity_factor=2.0,
                                         eval_capacity_factor=3.5, upcycle=False, aux_loss_weight=0.0,
                                         z_loss_weight=1e-4, seed=7)]
    assert parse_passes("--moe", " num-experts = 16 , layers=0-2+5, upcycle=YES") == [
        MoE(num_experts=16, layers=(0, 1, 2, 5), upcycle=True)]
    assert parse_passes("--moe", "layers=second_half") == [MoE(layers="second_half")]
    assert parse_passes("--moe", "layers=3") == [MoE(layers=(3,))]
    assert parse_passes("--moe", "layers=1+3,num_experts=4;8,gate=dts,residual=true,dropless=none") == [
        MoE(layers=(1, 3), num_experts=(4, 8), gate="dts", residual=True, dropless=None)]
    both = parse_passes("--random-ltd", "min_tokens=4,num_steps=8", "--moe", "top_k=1")
    assert both == [MoE(top_k=1), RandomLTD(min_tokens=4, num_steps=8)]  # MoE finds the MLPs first


@pytest.mark.parametrize(("value", "message"), [
    ("top_k", "'top_k' is not KEY=VALUE"),
    ("num_experts=", "'num_experts=' is not KEY=VALUE"),
    ("num_experts=x", "num_experts=x is not an integer, integers joined by ';' or '+', or none"),
    ("num_experts=4-8", "has the range '4-8'; give each value, e.g. 4;8"),
    ("top_k=1.5", "top_k=1.5 is not an integer"),
    ("capacity_factor=big", "capacity_factor=big is not a number"),
    ("capacity_factor=inf", "capacity_factor=inf is not a finite number"),
    ("upcycle=maybe", "upcycle=maybe is not true or false"),
    ("experts=8", "unknown key 'experts'"),
    ("k=2", "k is DeepSpeed's name; here it is top_k=2"),
    ("ep_size=4", "expert parallelism is a plan choice, e.g. --fix ep=4"),
    ("top_k=1,top_k=2", "top_k is given twice"),
    ("layers=odd", "MoE.layers = 'odd' is invalid"),
    ("layers=1;1", "names a layer twice"),
    ("layers=3-1", "expected A-B with A <= B"),
    ("num_experts=1", "MoE.num_experts = 1 is invalid"),
    ("num_experts=4,top_k=5", "MoE.top_k = 5 is invalid"),
    ("gate=switch", "MoE.gate = 'switch' is invalid"),
    ("capacity_factor=0", "MoE.capacity_factor = 0.0 is invalid"),
    ("z_loss_weight=-1", "MoE.z_loss_weight = -1.0 is invalid"),
])
def test_bad_values_exit_2_with_one_line(tmp_path, capfd, value, message):
    assert_one_line_error(capfd, tmp_path, ["--moe", value], message, plan=True)


def test_plan_with_moe(capfd):
    code, out, err = run_cli(capfd, "plan", "gpt-tiny", "--cluster", "8xA100-80GB", "--batch", "8",
                             "--moe", "num_experts=8", "--time-limit", "20")
    assert code == 0, err
    assert "graph passes: moe" in " ".join(out.split()), out


def test_plan_names_a_layer_the_model_lacks(capfd):
    code, out, err = run_cli(capfd, "plan", "gpt-tiny", "--cluster", "8xA100-80GB", "--batch", "8",
                             "--moe", "layers=1;9")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("autopar: error: pass 1 (moe) failed") and "names layer(s) [9]" in err, err


def test_run_hands_moe_to_the_script(tmp_path, capfd):
    [result] = run_script(capfd, tmp_path, SCRIPT, "--moe", "num_experts=4,top_k=1,layers=0;2", nproc=1)
    assert result["passes"] == [repr(MoE(num_experts=4, top_k=1, layers=(0, 2)))]
    assert result["applied"] == ["moe"] and result["moe"] == ["0", "2"]
    assert result["loads"] == {"0": 32, "2": 32}  # batch 2 × sequence 16 tokens each

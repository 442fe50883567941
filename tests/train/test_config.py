"""TrainConfig: keys by name, TOML with flags on top, values checked; the warm-up + cosine schedule."""

import math

import pytest

import autopar
from autopar.train.config import TrainConfig
from autopar.train.loop import lr_factor
from tests.helpers.cli import run_cli

BASE = {"model": "gpt-tiny", "corpus": "c", "out": "o", "steps": 10}


def test_toml_then_flags(tmp_path, capfd):
    path = tmp_path / "run.toml"
    path.write_text('model = "gpt-tiny"\ncorpus = "c"\nout = "o"\nsteps = 5\nlr = 1\nbetas = [0.8, 0.9]\n'
                    "[fix]\ndp = 2\n")
    config = TrainConfig.from_toml(path, steps=7)
    assert (config.steps, config.lr, config.betas, config.fix) == (7, 1.0, (0.8, 0.9), {"dp": 2})
    assert TrainConfig.from_json(config.to_json()) == config
    assert config.cluster_spec == "local:1"
    pinned = TrainConfig(**BASE, num_microbatches=2, fix={"dp": 2})
    assert pinned.compile_fix == {"dp": 2, "num_microbatches": 2}


@pytest.mark.parametrize(("values", "message"), [
    ({"stepz": 3}, "unknown key(s) ['stepz']"),
    ({"steps": 0}, "steps = 0 is invalid"),
    ({"steps": None}, "neither steps nor time_budget_s"),
    ({"lr": "fast"}, "lr = 'fast' is invalid"),
    ({"betas": [0.9]}, "betas"),
    ({"fix": {"dq": 2}}, "dq"),
    ({"min_lr_ratio": 2}, "min_lr_ratio = 2"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises((ValueError, TypeError), match=None) as info:
        TrainConfig.from_mapping({**BASE, **values})
    assert message in str(info.value)


def test_python_api_refuses_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epochs'\] in autopar.train"):
        autopar.train(**BASE, epochs=3)


def test_cli_unknown_config_key_is_one_line_exit_2(tmp_path, capfd):
    path = tmp_path / "run.toml"
    path.write_text('model = "gpt-tiny"\ncorpus = "c"\nout = "o"\nsteps = 5\nlearning_rate = 0.1\n')
    code, out, err = run_cli(capfd, "train", "--config", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "learning_rate" in err, err
    code, out, err = run_cli(capfd, "train", "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and "does not exist" in err


def test_warmup_then_cosine():
    config = TrainConfig(**{**BASE, "steps": 110}, warmup_steps=10, min_lr_ratio=0.1)
    factor = lr_factor(config)
    assert [factor(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert factor(10) == 1.0 and math.isclose(factor(60), 0.55) and math.isclose(factor(110), 0.1)
    assert lr_factor(TrainConfig(**{**BASE, "steps": None}, time_budget_s=5.0, warmup_steps=2))(50) == 1.0

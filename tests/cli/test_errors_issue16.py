"""``autopar plan`` honours a pinned schedule or refuses it in one line; a global batch that no
data-parallel degree divides is explained without suggesting to unpin what was not pinned
(issue 16, items 2 and 10)."""

import pytest

from autopar.cli.main import main
from autopar.plans import Plan


def run(capsys, *argv):
    code = main(["--no-color", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_pinned_1f1b_without_pipelining_is_kept(tmp_path, capsys):
    path = tmp_path / "p.json"
    code, out, err = run(capsys, "plan", "gpt2", "--cluster", "1x8xA100-80GB", "--batch", "64",
                         "--fix", "tp=2,schedule=1f1b", "-o", str(path))
    assert code == 0, err
    plan = Plan.load(path)
    assert plan.schedule.name == "1f1b" and plan.parallelism.tp == 2
    assert "1f1b" in out and "gpipe" not in out  # the alternatives keep the pin too


@pytest.mark.parametrize("pins, expected", [
    ("pp=1,schedule=interleaved", "interleaved needs pp > 1 and layers divisible by pp × virtual_stages"),
    ("pp=1,schedule=zero_bubble", "zero_bubble needs pp > 1"),
    ("pp=4,num_microbatches=2,schedule=1f1b", "1f1b with pp = 4 needs at least pp microbatches"),
])
def test_impossible_schedule_pin_is_one_line(pins, expected, tmp_path, capsys):
    path = tmp_path / "p.json"
    code, out, err = run(capsys, "plan", "gpt2", "--cluster", "1x8xA100-80GB", "--batch", "64",
                         "--fix", pins, "-o", str(path))
    assert code == 2 and not path.exists()
    assert err.startswith("autopar: error: no configuration to search: pinned schedule=")
    assert err.count("\n") == 1
    assert expected in err, err


def test_batch_7_on_8_devices_names_the_batch_not_tp(capsys):
    code, out, err = run(capsys, "plan", "gpt-tiny", "--cluster", "1x8xA100-80GB", "--batch", "7")
    assert code == 2 and err.count("\n") == 1, err
    assert "unpin" not in err and "global batch 7 cannot be split" in err
    assert "dp ∈ [2, 4, 8]" in err and "use a global batch divisible by 2 (e.g. 8)" in err


def test_batch_7_with_a_pin_names_that_pin(capsys):
    code, out, err = run(capsys, "plan", "gpt2", "--cluster", "1x8xA100-80GB", "--batch", "7",
                         "--fix", "pp=1")
    assert code == 2 and err.count("\n") == 1, err
    assert "global batch 7" in err and err.rstrip().endswith("or unpin pp") and "unpin tp" not in err

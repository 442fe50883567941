"""`autopar plan`, `show`, `diff` and `explain` end to end, and every user mistake as one line."""

import json
import sys
import textwrap
from pathlib import Path

import pytest

from autopar.cli.main import main
from autopar.cli.plan_cmd import parse_fix
from autopar.plans import Plan

sys.path.insert(0, str(Path(__file__).parents[1] / "views"))
from view_plans import XSS, hostile_plan, rich_plan, zoo_plan  # noqa: E402


def run(capsys, *argv):
    code = main(["--no-color", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def flat(text):
    return " ".join(text.split())


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """One real `autopar plan` run (gpt-tiny on 4 A100s, pp and schedule pinned) shared by the tests."""
    folder = tmp_path_factory.mktemp("planned")
    code = main(["--no-color", "plan", "gpt-tiny", "--cluster", "1x4xA100-80GB", "--batch", "8", "--fix",
                 "pp=2,schedule=gpipe", "-o", str(folder / "plan.json"), "--html", str(folder / "plan.html")])
    assert code == 0
    return folder


def test_plan_saves_prints_and_reports(planned, capsys):
    plan = Plan.load(planned / "plan.json")
    assert plan.model == "gpt-tiny" and plan.parallelism.pp == 2 and plan.schedule.name == "gpipe"
    assert plan.world_size == 4 and plan.global_batch_size == 8
    html = (planned / "plan.html").read_text()
    assert "autopar plan · gpt-tiny" in html and 'id="timeline"' in html
    code, out, err = run(capsys, "plan", "gpt-tiny", "--cluster", "local:2", "--batch", "4", "--seq", "16")
    assert code == 0, err
    text = flat(out)
    assert "plan · gpt-tiny" in text and "planned in" in text and "configurations evaluated" in text
    assert "local:2" in text and "(fp32 training)" in text  # CPU clusters keep the model's dtype
    assert "wrote" not in text


def test_show_every_format(planned, capsys):
    path = str(planned / "plan.json")
    code, out, err = run(capsys, "show", path)
    assert code == 0, err
    assert "pipeline stages" in out and "predicted step time" in out and "gpt-tiny" in out
    code, out, _ = run(capsys, "show", path, "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["model"] == "gpt-tiny" and data["per_stage_numbers"] == "cost model"
    code, out, _ = run(capsys, "show", path, "--format", "dot")
    assert code == 0 and out.startswith("digraph plan {")
    report = planned / "again.html"
    code, out, _ = run(capsys, "show", path, "--html", str(report))
    assert code == 0 and report.read_text().startswith("<!DOCTYPE html>")
    assert out.startswith(f"wrote {report}") and "KiB, rendered in" in out and "pipeline stages" not in out


def _user_plan(path):
    """A model defined here, as in a user's script: nothing can import or rebuild it by name."""
    import torch
    from torch import nn

    import autopar

    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(self.norm(x))))

    class ScriptNet(nn.Module):
        def __init__(self, vocab=512, width=64, depth=4):
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
            self.head = nn.Linear(width, vocab)

        def forward(self, idx):
            x = self.embed(idx)
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    plan = autopar.plan(ScriptNet(), torch.randint(0, 512, (2, 32)), cluster="1x8xA100-80GB",
                        global_batch_size=16, fix={"pp": 2, "tp": 1, "schedule": "1f1b", "recompute": "full"})
    plan.save(path)
    return plan


def test_a_plan_of_a_users_own_model_shows_its_per_stage_numbers(tmp_path, capsys, monkeypatch):
    import autopar

    path = tmp_path / "script_net.json"
    plan = _user_plan(path)
    assert plan.model == "ScriptNet" and plan.parallelism.pp == 2 and len(plan.predicted.stages) == 2

    def refuse(*args, **kwargs):
        raise AssertionError("a view tried to rebuild the model")

    for name in ("build", "get_config", "resolve_config"):
        monkeypatch.setattr(autopar.models, name, refuse, raising=False)
    code, out, err = run(capsys, "show", str(path))
    assert code == 0, err
    text = flat(out)
    assert "approximated" not in text and "per-stage numbers: the cost model's, stored in the plan" in text
    stages = out.split("pipeline stages")[1].split("predicted step time")[0]
    rows = [line.split() for line in stages.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert len(rows) == 2 and all("—" not in row[:8] for row in rows)  # params, fwd, bwd, comm per stage
    code, out, err = run(capsys, "show", str(path), "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["per_stage_numbers"] == "cost model"
    assert [s["forward_s"] for s in data["stages"]] == [s.forward_s for s in plan.predicted.stages]
    assert data["memory"][0]["parts_bytes"]["optimizer states"] > 0
    code, out, err = run(capsys, "explain", str(path))
    assert code == 0, err
    text = flat(out)
    assert "approximat" not in text and "stage balance: the slowest stage" in text
    assert "recomputes (full): without it its devices would need" in text
    code, out, err = run(capsys, "explain", str(path), "1")
    assert code == 0, err
    assert "per microbatch: forward" in flat(out) and "(approximate)" not in out


def test_show_escapes_hostile_names(tmp_path, capsys):
    path = tmp_path / "hostile.json"
    hostile_plan().save(path)
    code, out, err = run(capsys, "show", str(path), "--html", str(tmp_path / "r.html"), "--format", "text")
    assert code == 0, err
    assert XSS in out and XSS not in (tmp_path / "r.html").read_text()


def test_diff_and_explain(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    rich_plan().save(a)
    zoo_plan(tp=4, pp=1).save(b)
    code, out, err = run(capsys, "diff", str(a), str(b))
    assert code == 0, err
    assert "tp" in out and "×2" in out and "step time" in out and "compared fields unchanged" in out
    code, out, _ = run(capsys, "diff", str(a), str(a))
    assert code == 0 and "identical" in out
    code, out, err = run(capsys, "explain", str(a))
    assert code == 0, err
    assert "recomputes (full): without it" in flat(out) and "alternatives considered" in out
    code, out, _ = run(capsys, "explain", str(a), "blocks.3.attn.qkv")
    assert code == 0 and "layer 3 runs in stage 0" in flat(out) and "colwise" in out


def test_parse_fix():
    assert parse_fix("tp=8, pp=4 ,schedule=1f1b,zero=1") == {"tp": 8, "pp": 4, "schedule": "1f1b", "zero": 1}
    assert parse_fix(None) == {}


@pytest.fixture()
def files(tmp_path, monkeypatch):
    """Bad inputs on disk: corrupt, wrong version, not a plan, a model that cannot be traced."""
    (tmp_path / "corrupt.json").write_text("{not json")
    data = json.loads(rich_plan().to_json())
    (tmp_path / "v99.json").write_text(json.dumps({**data, "schema_version": 99}))
    (tmp_path / "notaplan.json").write_text(json.dumps({"schema_version": 1, "hello": "world"}))
    (tmp_path / "good.json").write_text(rich_plan().to_json())
    (tmp_path / "untraceable_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 4)

            def forward(self, x):
                return x if self.lin(x).sum() > 0 else -x

        def branchy():
            return Branchy(), torch.randn(2, 4)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


PLAN = ["plan", "gpt-tiny", "--cluster", "1x4xA100-80GB", "--batch", "8"]
BAD_INPUTS = [
    (["plan", "gpt-tiny", "--cluster", "2x8xNOPE-9000", "--batch", "8"], "NOPE-9000"),
    (["plan", "gpt-tiny", "--cluster", "", "--batch", "8"], "it is empty"),
    (["plan", "gpt-nonexistent", *PLAN[2:]], "unknown model 'gpt-nonexistent'"),
    ([*PLAN, "--fix", "tp8"], "--fix: 'tp8' is not KEY=VALUE"),
    ([*PLAN, "--fix", "tpp=2"], "unknown key(s) ['tpp']"),
    ([*PLAN, "--fix", "schedule=fast"], "fix['schedule'] = 'fast' is invalid"),
    ([*PLAN, "--fix", "tp=2,tp=4"], "tp is given twice"),
    ([*PLAN, "--fix", "tp=3"], "≠ world size 4"),
    (["plan", "gpt-tiny", "--cluster", "1x4xA100-80GB", "--batch", "0"], "--batch must be >= 1"),
    ([*PLAN, "--time-limit", "0"], "--time-limit must be > 0"),
    ([*PLAN, "-o", "/no/such/folder/plan.json"], "does not exist"),
    (["plan", "gpt3-6.7b", "--cluster", "1x1xA100-80GB", "--batch", "8"], "nothing fits in memory"),
    (["plan", "untraceable_models:branchy", "--cluster", "local:1", "--batch", "2"],
     "could not capture Branchy"),
    (["show", "missing.json"], "plan file 'missing.json' not found"),
    (["show", "corrupt.json"], "not valid JSON"),
    (["show", "v99.json"], "schema_version 99 is not supported"),
    (["show", "notaplan.json"], "unknown field(s) ['hello']"),
    (["show", "."], "is a directory"),
    (["show", "good.json", "--html", "/no/such/folder/r.html"], "does not exist"),
    (["diff", "good.json", "missing.json"], "not found"),
    (["explain", "good.json", "blocks.7.attn.qkvx"], "closest: blocks_7_attn_qkv"),
    (["explain", "good.json", "99"], "layer 99 is out of range"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS,
                         ids=[f"{argv[0]}-{i}" for i, (argv, _) in enumerate(BAD_INPUTS)])
def test_bad_input_is_one_line_and_exit_2(files, capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("autopar: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err, err


def test_debug_shows_the_traceback(files):
    with pytest.raises(ValueError, match="not valid JSON"):
        main(["--debug", "show", "corrupt.json"])


def test_plan_shows_search_progress_on_a_terminal():
    import io

    from rich.console import Console

    from autopar.cli.main import build_parser

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    args = build_parser().parse_args(["plan", "gpt-tiny", "--cluster", "1x4xA100-80GB", "--batch", "8"])
    assert args.run(args, console) == 0
    assert "capturing gpt-tiny" in screen.getvalue() and "planned in" in screen.getvalue()

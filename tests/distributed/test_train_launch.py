"""``autopar train`` and ``autopar.train`` on real process groups (issue 19): the CLI on 2 spawned
ranks writes metrics with held-out losses and checkpoints, and a second run with a larger
``--steps`` resumes and continues exactly as an uninterrupted run; a script that only calls
``autopar.train`` runs under ``torchrun --standalone --nproc-per-node 4`` (dp 2 × pp 2: each rank
reads only its data-parallel share) and on two "nodes" on loopback."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.generated import write_corpus
from tests.helpers.cli import run_cli
from tests.train.conftest import TINY

SCRIPT = Path(__file__).parents[1] / "helpers" / "scripts" / "train_torchrun.py"
ROOT = SCRIPT.parents[3]
BATCH = 4  # TINY's --global-batch-size


@pytest.fixture(scope="module", name="corpus_folder")
def _corpus_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder)
    return folder


@pytest.fixture(scope="module", name="cache_dir")
def _cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(capfd, out, corpus, cache, steps):
    return run_cli(capfd, "train", *TINY, "--corpus", str(corpus), "--out", str(out), "--cache-dir",
                   str(cache), "--nproc", "2", "--fix", "dp=2", "--steps", str(steps), "--eval-interval", "2",
                   "--checkpoint-interval", "2")


def test_cli_two_ranks_resume_continues_like_one_run(capfd, tmp_path, corpus_folder, cache_dir):
    out = tmp_path / "run"
    code, stdout, err = _train(capfd, out, corpus_folder, cache_dir, 2)
    assert code == 0, err
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2] and "eval_loss" in rows[1] and "eval_loss" not in rows[0]
    for key in ("loss", "tokens_per_s", "memory_bytes", "step_s", "predicted_step_s", "lr"):
        assert key in rows[0], key
    assert (out / "checkpoints" / "step_00000002" / ".metadata").is_file()
    assert "held-out loss" in stdout and "trained steps 0 → 2" in stdout

    code, stdout, err = _train(capfd, out, corpus_folder, cache_dir, 4)
    assert code == 0, err
    assert "resumed from" in stdout and "trained steps 2 → 4" in stdout
    resumed = _rows(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and resumed[:2] == rows
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]

    straight = tmp_path / "straight"
    code, _, err = _train(capfd, straight, corpus_folder, cache_dir, 4)
    assert code == 0, err
    for got, expected in zip(resumed, _rows(straight), strict=True):
        assert ("eval_loss" in got) == ("eval_loss" in expected)
        for key in ("loss", "lr", "tokens", "eval_loss"):
            if key in expected:
                assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), (key, got, expected)


def _torchrun():
    found = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if found is None:
        pytest.skip("torchrun is not installed beside this interpreter")
    return found


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _ranks(out):
    """Rank → what its script reported (``samples_read``, ``steps``, ``loss``)."""
    return {int(p.stem.removeprefix("rank")): json.loads(p.read_text()) for p in out.glob("rank*.json")}


def test_torchrun_four_ranks_each_reads_its_share(tmp_path, corpus_folder, cache_dir):
    out, steps = tmp_path / "out", 3
    command = [_torchrun(), "--standalone", "--nproc-per-node", "4", str(SCRIPT), str(corpus_folder),
               str(out), str(cache_dir), "dp=2,pp=2", str(steps)]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = _ranks(out)
    assert sorted(ranks) == [0, 1, 2, 3], result.stdout
    for report in ranks.values():
        assert report["samples_read"] == steps * BATCH // 2, report  # its dp share, not the global batch
        assert report["steps"] == [0, steps] and report["loss"] == ranks[0]["loss"]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and "eval_loss" in rows[1] and "eval_loss" in rows[2]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_on_loopback(tmp_path, corpus_folder, cache_dir):
    out, port, steps = tmp_path / "out", _free_port(), 2
    nodes = [subprocess.Popen([_torchrun(), "--nnodes", "2", "--nproc-per-node", "2", "--node-rank",
                               str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               str(SCRIPT), str(corpus_folder), str(out), str(cache_dir), "dp=4", str(steps)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-3000:]
    ranks = _ranks(out)
    assert sorted(ranks) == [0, 1, 2, 3], outputs
    assert {report["samples_read"] for report in ranks.values()} == {steps * BATCH // 4}
    assert len({report["loss"] for report in ranks.values()}) == 1, "every rank has the same loss"
    assert (out / "checkpoints" / f"step_{steps:08d}" / ".metadata").is_file()

"""Checkpoints saved under one Plan load under another (real gloo processes), and a
single-process round trip, atomic saves and the error messages (no process group)."""

import glob
import os
from pathlib import Path

import pytest
import torch

import autopar
from autopar import checkpoint
from autopar.runtime import spawn
from tests.helpers.distributed import checkpoint_workers as workers

# fp32 on CPU: Plan B sums the same terms in another order than Plan A.
RTOL, ATOL = 1e-5, 1e-6
HALF = workers.STEPS // 2


def _runs(folder, name):
    files = sorted(glob.glob(os.path.join(folder, f"{name}-rank*.pt")))
    assert files, f"no results for {name}"
    return [torch.load(f, weights_only=True) for f in files]


def _compare(folder, case):
    """Each rank's resumed parameters and losses equal the uninterrupted run's."""
    reference = {}
    for run in _runs(folder, f"{case}-reference"):
        reference.update(run["params"])
    expected = _runs(folder, f"{case}-reference")[0]["losses"]
    seen = set()
    for run in _runs(folder, f"{case}-resumed"):
        torch.testing.assert_close(run["losses"], expected[HALF:], rtol=RTOL, atol=ATOL)
        for fqn, value in run["params"].items():
            torch.testing.assert_close(value, reference[fqn], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, f=fqn: f"{case} {f}: {m}")
        seen |= set(run["params"])
    assert seen == set(reference), set(reference) ^ seen


def test_reshard_four_ranks_to_two_and_two_to_two(tmp_path):
    """Saved by pp2 × dp2 (ZeRO-3) on 4 ranks, loaded by tp2 on 2; then, in the same 2 processes
    (start-up costs more than a case), pp2 → dp2 with FSDP2 ZeRO-3 (engine built by load) and dp2
    replicate → pp2 (load after a step)."""
    spawn(workers.four_rank_save, 4, str(tmp_path), timeout_s=60)
    spawn(workers.two_rank_resume_then_two_rank_cases, 2, str(tmp_path), timeout_s=60)
    _compare(tmp_path, "pp2dp2-tp2")
    _compare(tmp_path, "pp2-dp2z3")
    _compare(tmp_path, "dp2z0-pp2")


@pytest.fixture
def one_thread():
    """Like the spawned ranks: intra-op threads contend with the other tests' processes."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _single(num_layers=4):
    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=num_layers)
    batch = autopar.models.example_batch(model, batch_size=8, seq_len=16, seed=1)
    return autopar.compile(model, "local:1", optimizer=workers._adamw), batch


def test_single_process_round_trip(tmp_path, monkeypatch, one_thread):
    """No process group: save after step 2, a save after step 3 that crashes midway, step 4;
    a new Compiled loads the step-2 checkpoint and its steps 3–4 match."""
    compiled, batch = _single()
    losses = [compiled.step(*batch) for _ in range(2)]
    autopar.save(compiled, tmp_path / "ckpt", extra={"kept_tokens": 12, "schedule": torch.arange(3)})

    def crash(*args, **kwargs):  # a save that dies after writing part of the files
        os.makedirs(kwargs["checkpoint_id"], exist_ok=True)
        Path(kwargs["checkpoint_id"], "__0_0.distcp").write_bytes(b"half")
        raise KeyboardInterrupt

    losses.append(compiled.step(*batch))
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(checkpoint._dcp(), "save", crash)  # torch.distributed.checkpoint
        autopar.save(compiled, tmp_path / "ckpt")
    losses.append(compiled.step(*batch))
    resumed, _ = _single()
    extra = autopar.load(resumed, tmp_path / "ckpt")
    assert resumed.num_steps == 2 and int(extra["kept_tokens"]) == 12
    assert torch.equal(extra["schedule"], torch.arange(3))
    assert [resumed.step(*batch) for _ in range(2)] == pytest.approx(losses[2:], rel=RTOL, abs=ATOL)
    for (fqn, a), (_, b) in zip(resumed.module.named_parameters(), compiled.module.named_parameters(),
                                strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m, f=fqn: f"{f}: {m}")
    autopar.save(resumed, tmp_path / "ckpt")  # replaces the old one, clears the crashed partial
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_errors(tmp_path, one_thread):
    compiled, batch = _single()
    with pytest.raises(ValueError, match=r"no checkpoint directory at .*missing.*autopar\.save"):
        autopar.load(compiled, tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / ".metadata").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk is not a complete checkpoint"):
        autopar.load(compiled, tmp_path / "junk")
    small, _ = _single(num_layers=2)
    autopar.save(small, tmp_path / "small")
    with pytest.raises(ValueError, match=r"model\.blocks\.2\..* is missing.*only into the model"):
        autopar.load(compiled, tmp_path / "small")
    assert not compiled.optimizer.state  # a failed load leaves the optimizer as it was
    with pytest.raises(ValueError, match=r"extra\['note'\] is a str.*tensor"):
        autopar.save(compiled, tmp_path / "bad", extra={"note": "text"})

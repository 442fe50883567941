"""Per-rank body of the optimizer test: ``compiled.optimizer`` is the optimizer the engine steps,
so learning-rate changes and ``torch.optim.lr_scheduler`` schedulers act on several processes."""

from __future__ import annotations

import pytest
import torch

import autopar


def _params(compiled: autopar.Compiled) -> list[torch.Tensor]:
    return [p.detach().clone() for copies in compiled.executor.parameter_copies().values() for p in copies]


def lr_reaches_the_engine(rank: int, world: int) -> None:
    for fix in ({"dp": 2}, {"pp": 2, "num_microbatches": 2}):
        torch.manual_seed(0)
        model = autopar.models.build("gpt", num_layers=2, hidden_size=32, num_heads=2, vocab_size=64,
                                     seq_len=8)
        inputs, targets = autopar.models.example_batch(model, batch_size=4, seq_len=8)
        compiled = autopar.compile(model, f"local:{world}", fix=fix,
                                   optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
        with pytest.raises(ValueError, match="prepare"):
            compiled.optimizer  # noqa: B018 - the engine (and its optimizer) does not exist yet
        compiled.prepare(inputs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(compiled.optimizer, lambda i: 1.0 if i < 1 else 0.0)
        assert compiled.optimizer is compiled.executor.optimizer
        first = compiled.step(inputs, targets)
        scheduler.step()  # lr 0 from now on: nothing may move
        before = _params(compiled)
        second, third = compiled.step(inputs, targets), compiled.step(inputs, targets)
        assert second != first and second == third, (fix, first, second, third)
        assert all(torch.equal(a, b) for a, b in zip(before, _params(compiled), strict=True)), fix

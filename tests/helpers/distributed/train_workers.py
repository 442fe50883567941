"""Per-rank bodies of the per-rank-batch, evaluation, gathering and clipping tests (issue 19).

Each case compiles a tiny GPT under one pinned layout on the spawned gloo group and checks, against
the same training done by plain PyTorch in one process: a step on each rank's own rows
(``local=True``) and a step on the global batch give the one-process loss, the total gradient norm
and the clipped update; ``evaluate`` gives the one-process held-out loss and changes nothing; the
gathered module holds the one-process weights and computes the same loss; a per-rank batch passed
as global is refused, on every rank, naming both sizes.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import autopar
from autopar.losses import cross_entropy

RTOL, ATOL = 1e-5, 1e-6  # fp32 on CPU: the parallel program sums the same terms in another order
LR, MAX_NORM = 0.1, 0.05  # a norm small enough that every step clips
BATCH, SEQ = 8, 8
CASES = ({"dp": 2, "zero": 3}, {"pp": 2, "num_microbatches": 2}, {"tp": 2}, {"cp": 2})


def _close(got: float, expected: float, what: str) -> None:
    assert abs(got - expected) <= ATOL + RTOL * abs(expected), f"{what}: {got} != {expected}"


def _model_and_batches() -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=2, hidden_size=32, num_heads=2, vocab_size=64, seq_len=SEQ)
    batches = [autopar.models.example_batch(model, batch_size=BATCH, seq_len=SEQ) for _ in range(3)]
    return model, batches


def _reference_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                    targets: torch.Tensor) -> tuple[float, float]:
    optimizer.zero_grad()
    loss = cross_entropy(model(inputs), targets)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    optimizer.step()
    return float(loss), float(norm)


def _own_rows(compiled: autopar.Compiled, value: torch.Tensor) -> torch.Tensor | None:
    """This rank's rows of a global batch, or None where its stages need no data."""
    engine = compiled.engine
    if not (engine.has_first or engine.has_last):
        return None
    dp = compiled.plan.parallelism.dp
    return value.chunk(dp)[engine.layout.dp_rank]


def case(fix: dict) -> None:
    model, batches = _model_and_batches()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    compiled = autopar.compile(model, f"local:{dist.get_world_size()}", fix=fix, max_grad_norm=MAX_NORM,
                               optimizer=lambda p: torch.optim.SGD(p, lr=LR))
    (x0, y0), (x1, y1), (x2, y2) = batches
    compiled.prepare(x0)
    _refused_as_global(compiled, x0, y0, fix)
    with torch.no_grad():
        before = float(cross_entropy(reference(x2), y2))
    _close(compiled.evaluate(x2, y2), before, f"{fix} evaluate before training")
    loss = compiled.step(_own_rows(compiled, x0), _own_rows(compiled, y0), local=True)
    expected, norm = _reference_step(reference, ref_opt, x0, y0)
    _close(loss, expected, f"{fix} local step loss")
    _close(compiled.last_grad_norm, norm, f"{fix} gradient norm")
    assert norm > MAX_NORM, "the test must clip"
    loss = compiled.step(x1, y1)
    expected, norm = _reference_step(reference, ref_opt, x1, y1)
    _close(loss, expected, f"{fix} global step loss")
    _close(compiled.last_grad_norm, norm, f"{fix} gradient norm, step 2")
    steps = compiled.num_steps
    with torch.no_grad():
        held_out = float(cross_entropy(reference(x2), y2))
    _close(compiled.evaluate(_own_rows(compiled, x2), _own_rows(compiled, y2), local=True), held_out,
           f"{fix} local evaluate")
    _close(compiled.evaluate(x2, y2), held_out, f"{fix} evaluate")
    assert compiled.num_steps == steps
    gathered = compiled.gather_module()
    for name, param in reference.named_parameters():
        got = gathered.get_parameter(name)
        assert type(got) is torch.nn.Parameter and not isinstance(got.data, torch.distributed.tensor.DTensor)
        torch.testing.assert_close(got, param, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{fix} {n}: {m}")
    assert gathered.lm_head.weight is gathered.wte.weight, "tied weights stay tied"
    with torch.no_grad():
        _close(float(cross_entropy(gathered(x2), y2)), held_out, f"{fix} gathered module loss")
    loss = compiled.step(x2, y2)  # training goes on after evaluating and gathering
    expected, _ = _reference_step(reference, ref_opt, x2, y2)
    _close(loss, expected, f"{fix} step after evaluate/gather")


def _refused_as_global(compiled: autopar.Compiled, inputs: torch.Tensor, targets: torch.Tensor,
                       fix: dict) -> None:
    dp = compiled.plan.parallelism.dp
    if dp == 1:
        return
    own, own_targets = _own_rows(compiled, inputs), _own_rows(compiled, targets)
    try:
        compiled.step(own, own_targets)
    except ValueError as err:
        text = str(err)
        assert f"{BATCH // dp} rows" in text and f"{BATCH}" in text and "local=True" in text, text
    else:
        raise AssertionError(f"{fix}: a per-rank batch passed as global was accepted")
    assert compiled.num_steps == 0


def run_cases(rank: int, world_size: int) -> None:
    for fix in CASES:
        case(fix)

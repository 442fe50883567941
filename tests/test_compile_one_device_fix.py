"""One device honours the pins it can run (gradient accumulation over microbatches, full and
selective recomputation) and refuses the ones it cannot (pipeline schedules), never ignoring a pin:
three SGD steps equal the same steps by hand (fp32, rel 1e-5), and the executed Plan says what ran."""

import copy

import pytest
import torch
import torch.nn.functional as F

import autopar
from autopar.runtime.recompute import Recomputed

# SGD, not Adam: Adam's normalised step turns the fp32 rounding of gradients that are 0 in exact
# arithmetic (the key bias: softmax ignores a shift) into ±lr, whatever the summation order.
SGD = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731


def _by_hand(model, inputs, targets, num_steps=3):
    optimizer = SGD(model.parameters())
    losses = []
    for _ in range(num_steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs).flatten(0, -2), targets.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _case():
    torch.manual_seed(0)
    model = autopar.models.build("gpt-tiny")
    inputs, targets = autopar.models.example_batch(model, batch_size=4, seed=1)
    targets = targets.clone()
    targets[0, : targets.shape[1] // 2] = -100  # microbatches with different counted tokens
    return model, copy.deepcopy(model), inputs, targets


@pytest.mark.parametrize(("fix", "count", "recompute"), [
    ({"num_microbatches": 2}, 2, "none"),
    ({"microbatch_size": 1, "recompute": "full"}, 4, "full"),
    ({"recompute": "selective"}, 1, "selective"),
])
def test_pins_run_and_equal_the_steps_by_hand(fix, count, recompute):
    model, reference, inputs, targets = _case()
    compiled = autopar.compile(model, "local:1", optimizer=SGD, fix=fix)
    losses = [compiled.step(inputs, targets) for _ in range(3)]
    assert losses == pytest.approx(_by_hand(reference, inputs, targets), rel=1e-5)
    for (key, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=key)
    plan = compiled.plan
    assert (plan.schedule.num_microbatches, plan.schedule.microbatch_size) == (count, 4 // count)
    assert plan.global_batch_size == 4 and plan.stages[0].recompute == recompute
    ran = [module for _, module in compiled.executor._recomputed.values()]
    wrapped = [m for module in ran for m in module.modules() if isinstance(m, Recomputed)]
    assert (len(wrapped) > 0) == (recompute != "none") and all(m.mode == recompute for m in wrapped)
    assert compiled.num_lowered == 1 and compiled.captured.example_args[0].shape[0] == 4 // count


@pytest.mark.parametrize(("fix", "message"), [
    ({"schedule": "1f1b"}, "fix['schedule'] = '1f1b' needs pp > 1"),
    ({"virtual_stages": 2}, "fix['virtual_stages'] = 2 needs pp > 1"),
    ({"num_microbatches": 3}, "batch of 4 sequences does not split into 3 microbatches"),
])
def test_pins_one_device_cannot_run_are_refused(fix, message):
    model, _, inputs, targets = _case()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        autopar.compile(model, "local:1", optimizer=SGD, fix=fix).step(inputs, targets)

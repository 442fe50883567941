"""One device: ``Compiled.evaluate`` is the model's loss and changes nothing, ``step(local=True)`` is a
step, ``max_grad_norm`` clips like ``torch.nn.utils.clip_grad_norm_``, ``gather_module`` is the
trained model as plain parameters; a per-rank batch needs ``prepare`` first on several devices."""

import copy

import pytest
import torch

import autopar
from autopar.losses import cross_entropy


def test_evaluate_step_clip_and_gather_on_one_device():
    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=2, hidden_size=32, num_heads=2, vocab_size=64, seq_len=8)
    reference = copy.deepcopy(model)
    (x, y), (x2, y2) = (autopar.models.example_batch(model, batch_size=4, seq_len=8) for _ in range(2))
    compiled = autopar.compile(model, max_grad_norm=0.1, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    with torch.no_grad():
        expected = float(cross_entropy(reference(x2), y2))
    assert compiled.evaluate(x2, y2) == pytest.approx(expected, rel=1e-6)
    assert compiled.num_steps == 0 and compiled.training
    loss = compiled.step(x, y, local=True)
    optimizer.zero_grad()
    reference_loss = cross_entropy(reference(x), y)
    reference_loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    optimizer.step()
    assert loss == pytest.approx(reference_loss.detach().item(), rel=1e-6)
    assert norm > 0.1 and compiled.last_grad_norm == pytest.approx(float(norm), rel=1e-5)
    gathered = compiled.gather_module()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(gathered.get_parameter(name), param, rtol=1e-5, atol=1e-6)
    assert gathered.get_parameter("wte.weight") is not model.wte.weight
    with torch.no_grad():
        assert compiled.evaluate(x2, y2) == pytest.approx(float(cross_entropy(reference(x2), y2)), rel=1e-5)


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), True, "1"])
def test_max_grad_norm_must_be_positive(value):
    with pytest.raises(ValueError, match="max_grad_norm"):
        autopar.compile(autopar.models.build("gpt-tiny"), max_grad_norm=value)

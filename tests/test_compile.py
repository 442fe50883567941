"""autopar.compile on one device: lazy capture, equivalence with eager, training step
equal to the same step by hand, decorator forms, option errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autopar
from autopar.compile import Compiled

ADAM = lambda params: torch.optim.AdamW(params, lr=1e-2)  # noqa: E731


def _manual_steps(model, inputs, targets, num_steps):
    optimizer = ADAM(model.parameters())
    losses = []
    for _ in range(num_steps):
        optimizer.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["gpt-tiny", "bert-tiny"])
def test_step_equals_manual_step(name):
    torch.manual_seed(0)
    model = autopar.models.build(name)
    reference = copy.deepcopy(model)
    inputs, targets = autopar.models.example_batch(model, batch_size=4, seed=1)
    compiled = autopar.compile(model, "local:1", optimizer=ADAM)
    losses = [compiled.step(inputs, targets) for _ in range(3)]
    assert all(isinstance(loss, float) for loss in losses)
    assert losses == pytest.approx(_manual_steps(reference, inputs, targets, 3), rel=1e-6)
    for (key, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=key)
    assert compiled.num_steps == 3
    # The step ran the captured graph, not the eager module.
    assert isinstance(compiled.captured.graph_module, torch.fx.GraphModule)
    assert compiled.captured.layers


def test_call_is_lazy_and_equals_eager():
    torch.manual_seed(0)
    model = autopar.models.build("gpt-tiny").eval()
    compiled = autopar.compile(model, "local:1").eval()
    with pytest.raises(RuntimeError, match="nothing captured yet"):
        _ = compiled.captured
    x, _ = autopar.models.example_batch(model, batch_size=2)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    first = compiled.captured
    compiled(x)
    assert compiled.captured is first  # same signature: no new capture
    shorter = x[:, :8]
    torch.testing.assert_close(compiled(shorter), model(shorter), rtol=0, atol=0)
    assert compiled.captured is not first  # new shape: captured again


def test_plan_of_single_device_run(tmp_path):
    model = autopar.models.build("gpt-tiny")
    compiled = autopar.compile(model)
    inputs, targets = autopar.models.example_batch(model, batch_size=4, seq_len=16)
    compiled.step(inputs, targets)
    plan = compiled.plan
    assert plan.parallelism.world_size == 1 and plan.global_batch_size == 4 and plan.seq_len == 16
    assert plan.stages[0].layers == (0, len(compiled.captured.layers))
    assert plan.graph_fingerprint == autopar.plans.graph_fingerprint(compiled.captured.graph_module)
    plan.save(tmp_path / "plan.json")
    assert autopar.Plan.load(tmp_path / "plan.json", expect_fingerprint=plan.graph_fingerprint) == plan


def test_hf_gpt2_step_through_export():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                             n_positions=32, bos_token_id=0, eos_token_id=0,
                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 16))
    compiled = autopar.compile(model, optimizer=ADAM)
    loss = compiled.step(ids, ids)
    assert compiled.captured.frontend == "export"
    optimizer = ADAM(reference.parameters())
    ref = F.cross_entropy(reference(ids).logits.flatten(0, 1), ids.flatten())
    ref.backward()
    optimizer.step()
    assert loss == pytest.approx(ref.item(), rel=1e-6)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@autopar.compile(cluster="local:1", optimizer=ADAM)
class DecoratedMLP(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@autopar.compile
class BareDecorated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


def test_decorator_forms():
    torch.manual_seed(0)
    net = DecoratedMLP(width=8)
    assert isinstance(net, Compiled) and isinstance(net.module, nn.Module)
    assert DecoratedMLP.original_class.__name__ == "DecoratedMLP"
    reference = copy.deepcopy(net.module)
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    torch.testing.assert_close(net(x), reference(x))
    loss = net.step(x, y)
    optimizer = ADAM(reference.parameters())
    ref = F.cross_entropy(reference(x), y)
    ref.backward()
    optimizer.step()
    assert loss == pytest.approx(ref.item(), rel=1e-6)
    bare = BareDecorated()
    assert isinstance(bare, Compiled) and bare.cluster.num_devices == 1
    assert bare(torch.randn(3, 4)).shape == (3, 2)


def test_custom_loss_and_dict_inputs():
    class Scorer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x, scale):
            return self.lin(x) * scale

    torch.manual_seed(0)
    compiled = autopar.compile(Scorer(), loss_fn=lambda out, t: ((out - t) ** 2).mean())
    x = torch.randn(6, 4)
    loss = compiled.step({"x": x, "scale": torch.tensor(2.0)}, torch.zeros(6, 1))
    assert loss > 0


def test_option_errors():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="unknown key.*'tpp'.*valid keys"):
        autopar.compile(model, fix={"tpp": 2})
    with pytest.raises(ValueError, match="schedule.*expected one of"):
        autopar.compile(model, fix={"schedule": "zigzag"})
    with pytest.raises(ValueError, match="positive int"):
        autopar.compile(model, fix={"pp": 0})
    with pytest.raises(ValueError, match="zero"):
        autopar.compile(model, fix={"zero": 4})
    with pytest.raises(ValueError, match="16 devices.*process group has 1.*torchrun"):
        autopar.compile(model, "2x8xA100-80GB")
    with pytest.raises(ValueError, match="autopar run script.py --nproc 4"):
        autopar.compile(model, "local:4")
    with pytest.raises(ValueError, match="dp×tp×pp×cp = 4"):
        autopar.compile(model, fix={"tp": 2, "pp": 2})
    with pytest.raises(TypeError, match="needs an nn.Module"):
        autopar.compile(42)
    with pytest.raises(TypeError, match="decorates nn.Module subclasses"):
        autopar.compile(int)
    with pytest.raises(TypeError, match="scalar tensor"):
        autopar.compile(model, loss_fn=lambda out, t: out).step(torch.randn(3, 2), None)


def test_user_mistakes_give_one_clear_line(tmp_path):
    """Issue 16 item 10: an optimizer instance, an unwritable checkpoint folder."""
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="factory.*got an instance of SGD"):
        autopar.compile(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    compiled = autopar.compile(model, loss_fn=lambda out, t: out.square().mean())
    compiled.step(torch.randn(3, 2), None)
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where a folder should be
    with pytest.raises(ValueError, match=r"cannot save checkpoint .*cannot create its folder"):
        autopar.save(compiled, blocked / "sub" / "ckpt")
    assert not (tmp_path / "file.partial").exists()

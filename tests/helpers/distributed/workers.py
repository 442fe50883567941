"""Per-rank bodies of the distributed tests (importable, so spawned ranks can run them).

Each case trains a model for 3 steps through ``autopar.compile`` on the spawned gloo
group and compares every step's loss, and after the last step every gradient and
parameter, with the same training done by plain PyTorch in one process.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Callable, Iterator

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

import autopar
from autopar.capture.batch import leading_dims
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.losses import cross_entropy
from autopar.plans.megatron import megatron_shardings
from autopar.plans.pinned import plan_from_fix
from autopar.runtime.recompute import LayerUnit, Recomputed

# fp32 on CPU: the pipelined program sums the same terms in another order.
RTOL, ATOL = 1e-5, 1e-6
LAYER = re.compile(r"(?:^|\.)(?:blocks|layers|layer|h)\.(\d+)\.")
STEPS = 3
LR = 0.05


class CollectiveCounter:
    """Counts DTensor's functional collectives during a step (wraps and calls through)."""

    NAMES = ("all_reduce", "reduce_scatter_tensor", "all_gather_tensor")

    def __enter__(self):
        self.counts: dict[str, int] = {}
        self.saved = {name: getattr(funcol, name) for name in self.NAMES}
        for name, original in self.saved.items():
            setattr(funcol, name, self._counting(name, original))
        return self

    def _counting(self, name, original):
        def wrapper(*args, **kwargs):
            self.counts[name] = self.counts.get(name, 0) + 1
            return original(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(funcol, name, original)


def sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def reference_step(model, optimizer, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """One step of plain PyTorch training in one process (cross-entropy); its loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = cross_entropy(model(inputs), targets)
    loss.backward()
    optimizer.step()
    return loss.item()


def reference_losses(reference, inputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """The losses of ``STEPS`` plain single-process steps (``reference`` is trained in place)."""
    optimizer = sgd(reference.parameters())
    return [reference_step(reference, optimizer, inputs, targets) for _ in range(STEPS)]


def train_and_compare(compiled, reference, inputs: torch.Tensor, targets: torch.Tensor, label, *,
                      step: Callable[[int], float] | None = None) -> None:
    """Train ``compiled`` for ``STEPS`` steps (``step(i)`` runs step i, by default ``compiled.step``) and
    ``reference`` in one process, then compare every loss, and every gradient and parameter."""
    for i, want in enumerate(reference_losses(reference, inputs, targets)):
        loss = compiled.step(inputs, targets) if step is None else step(i)
        assert abs(loss - want) <= RTOL * abs(want) + ATOL, (label, i, loss, want)
    compare_parameters(compiled.engine, reference, label)


def build_case(name: str):
    torch.manual_seed(0)
    if name == "gpt":
        model = autopar.models.build("gpt", num_layers=4)
    elif name == "bert":
        model = autopar.models.build("bert", num_layers=4)
    elif name == "hf-gpt2":
        import transformers as tf

        config = tf.GPT2Config(n_layer=HF_LAYERS, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                               bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                               attn_pdrop=0.0)
        model = tf.GPT2LMHeadModel(config)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 64, (8, 16), generator=generator)
        return model, ids, ids.roll(-1, dims=1)
    elif name in HF_CONFIGS:
        model = hf_model(name)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 64, (8, 16), generator=generator)
        return model, ids, (ids if name == "hf-bert" else ids.roll(-1, dims=1))
    else:
        raise ValueError(name)
    inputs, targets = autopar.models.example_batch(model, batch_size=8, seq_len=16, seed=1)
    return model, inputs, targets


# Tiny Hugging Face configs (random weights, nothing downloaded): 2 layers (enough for two pipeline
# stages; each layer costs capture time in every case), hidden 32, 2 heads (Llama-
# family models with 2 KV heads, one per tensor-parallel rank), vocabulary 64, dropout off.
HF_LAYERS = 2
HF_CONFIGS = {
    "hf-bert": ("BertConfig", "BertForMaskedLM", dict(
        num_hidden_layers=HF_LAYERS, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    "hf-llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_hidden_layers=HF_LAYERS, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=32)),
    "hf-mistral": ("MistralConfig", "MistralForCausalLM", dict(num_hidden_layers=HF_LAYERS, hidden_size=32,
                   num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                   max_position_embeddings=32, sliding_window=None)),
    "hf-qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_hidden_layers=HF_LAYERS, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=32)),
}


def hf_model(name: str) -> torch.nn.Module:
    import transformers as tf

    config_class, model_class, options = HF_CONFIGS[name]
    config = getattr(tf, config_class)(vocab_size=64, use_cache=False, **options)
    return getattr(tf, model_class)(config)


@contextlib.contextmanager
def case_named(*label: object) -> Iterator[None]:
    """Within a spawn that runs several cases in turn: a failed assertion names its case first."""
    try:
        yield
    except AssertionError as err:
        raise AssertionError(f"case {label}: {err}") from err


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def run_case(world: int, name: str, fix: dict, layers=None, expect=None, recompute=None) -> None:
    """Train ``name`` under ``fix`` (and hand-set stage layer ranges or per-stage
    recomputation: a hand-written Plan) and compare."""
    model, inputs, targets = build_case(name)
    reference = copy.deepcopy(model)
    compiled = autopar.compile(model, f"local:{world}", fix=fix, optimizer=sgd)
    megatron = fix.get("tp", 1) > 1  # run Megatron's own layout, whatever the planner would choose
    if layers is not None or recompute is not None or megatron:  # a hand-written Plan
        plan = hand_written_plan(model, inputs, world, fix)
        layers = layers or [s.layers for s in plan.stages]
        recompute = recompute or [s.recompute for s in plan.stages]
        stages = tuple(dataclasses.replace(s, layers=r, recompute=c)
                       for s, r, c in zip(plan.stages, layers, recompute, strict=True))
        compiled = autopar.compile(model, f"local:{world}", plan=dataclasses.replace(plan, stages=stages),
                                   optimizer=sgd)
    counter = CollectiveCounter()

    def step(i: int) -> float:  # the first step captures; count collectives on the later ones
        if i == 0:
            return compiled.step(inputs, targets)
        with counter:
            return compiled.step(inputs, targets)

    train_and_compare(compiled, reference, inputs, targets, (name, fix), step=step)
    check_transformation(compiled.engine, reference, fix, expect or {})
    if fix.get("tp", 1) > 1:  # DTensor issued the tensor-parallel all-reduces (on the last step)
        assert counter.counts.get("all_reduce", 0) > 0, counter.counts
    if fix.get("tp", 1) > 1 and fix.get("pp", 1) == 1 and fix.get("dp", 1) == 1:
        _check_megatron_forward(compiled, inputs, len(compiled.captured.layers))


def hand_written_plan(model, inputs, world: int, fix: dict):
    """The Plan the pins describe (no planner involved), with Megatron's tensor-parallel layout when
    tp > 1, for ``model`` at the plan's microbatch. Only the microbatch is captured (a Hugging Face
    capture costs about a second): the pins fix its size whatever the number of layers."""
    batch, seq_len = leading_dims((inputs,), {})

    def pinned(num_layers: int):
        return plan_from_fix(type(model).__name__, graph_fingerprint="unset", num_layers=num_layers,
                             cluster=ClusterSpec.parse(f"local:{world}"), fix=Fix.from_dict(fix),
                             global_batch_size=batch, seq_len=seq_len)

    micro = pinned(num_layers=64).schedule.microbatch_size  # any layer count that every stage can share
    runtime = autopar.lower(model, inputs, microbatch_size=micro)
    plan = pinned(num_layers=len(runtime.captured.layers))
    assert plan.schedule.microbatch_size == micro and runtime.seq_len == seq_len
    shardings = megatron_shardings(runtime.graph_module, fix["tp"], vocab_parallel=fix.get("pp", 1) == 1) \
        if fix.get("tp", 1) > 1 else ()
    return dataclasses.replace(plan, graph_fingerprint=runtime.fingerprint, shardings=shardings)


def _check_megatron_forward(compiled, inputs, num_layers: int) -> None:
    """Megatron's forward: two all-reduces per layer (attention and MLP outputs) plus one
    for the vocabulary-parallel embedding, no all-gather — attention ran head-sharded."""
    micro = inputs[: compiled.plan.schedule.microbatch_size]
    vocab = sum(s.strategy == "vocab" for s in compiled.plan.shardings)
    assert vocab == 1, compiled.plan.shardings
    with CollectiveCounter() as counter, torch.no_grad():
        compiled.engine.modules[0](micro)
    assert counter.counts == {"all_reduce": 2 * num_layers + vocab}, counter.counts


def compare_parameters(engine, reference, label) -> None:
    ref = dict(reference.named_parameters(remove_duplicate=False))
    for fqn, param in engine.named_parameters():
        torch.testing.assert_close(full_tensor(param.grad), ref[fqn].grad, rtol=RTOL, atol=ATOL,
                                   msg=lambda m, f=fqn: f"{label} grad {f}: {m}")
        torch.testing.assert_close(full_tensor(param.detach()), ref[fqn].detach(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m, f=fqn: f"{label} param {f}: {m}")


def check_transformation(engine, reference, fix: dict, expect: dict) -> None:
    """The parallelism really happened: stages, layers per rank, sharded parameters."""
    plan = engine.plan
    pp = fix.get("pp", 1)
    assert engine.num_stages == pp * plan.schedule.virtual_stages
    mine = engine.named_parameters()
    total = len(dict(reference.named_parameters()))
    if pp > 1:
        assert len(mine) < total, "a pipeline rank must hold only its stages' parameters"
        layers = {int(m.group(1)) for n, _ in mine if (m := LAYER.search(n))}
        wanted = {layer for i in engine.stage_indices for layer in range(*plan.stages[i].layers)}
        assert layers and layers <= wanted, (layers, wanted)
    if fix.get("dp", 1) > 1:
        assert all(isinstance(p, DTensor) for _, p in mine)
        if fix.get("zero", 0) >= 1:
            sharded = [p for _, p in mine if any(isinstance(x, Shard) for x in p.placements)]
            assert sharded and all(p.to_local().numel() < p.numel() for p in sharded if p.shape[0] > 1)
            for index, module in zip(engine.stage_indices, engine.modules, strict=True):
                units = [m for m in module.modules() if isinstance(m, FSDPModule)]  # one per layer + root
                first, last = plan.stages[index].layers
                assert len(units) >= last - first + 1 and all(
                    isinstance(m, FSDPModule) for m in module.modules() if isinstance(m, LayerUnit)), index
    if fix.get("tp", 1) > 1:
        tp_sharded = [p for _, p in mine if isinstance(p, DTensor)
                      and any(isinstance(x, Shard) for x in p.placements[-1:])]
        assert tp_sharded, "tensor parallelism must shard some weights"
        for p in tp_sharded:
            assert p.to_local().numel() * fix["tp"] <= p.numel() * fix.get("dp", 1), (p.shape, p.placements)
    for index, module in zip(engine.stage_indices, engine.modules, strict=True):
        wrapped = [m.mode for m in module.modules() if isinstance(m, Recomputed)]
        mode = plan.stages[index].recompute
        assert (set(wrapped) == {mode}) if mode != "none" else not wrapped, (index, mode, wrapped)
    for key, value in expect.items():
        assert getattr(engine, key) == value, (key, getattr(engine, key), value)


def two_rank_matrix(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    run_case(world, "gpt", {"dp": 2, "num_microbatches": 2})
    run_case(world, "gpt", {"dp": 2, "num_microbatches": 2, "zero": 3})
    for schedule in ("gpipe", "1f1b", "interleaved", "zero_bubble"):
        run_case(world, "gpt", {"pp": 2, "schedule": schedule, "num_microbatches": 4})
    run_case(world, "gpt", {"pp": 2, "num_microbatches": 2, "recompute": "full"})
    run_case(world, "gpt", {"pp": 2, "num_microbatches": 2, "recompute": "selective"})
    run_case(world, "gpt", {"pp": 2, "num_microbatches": 2}, layers=[(0, 3), (3, 4)],
             recompute=["full", "none"])  # uneven stages; stage-aware recomputation
    run_case(world, "bert", {"pp": 2, "num_microbatches": 4})
    run_case(world, "hf-gpt2", {"pp": 2, "num_microbatches": 2})
    run_case(world, "gpt", {"tp": 2, "num_microbatches": 2})
    run_case(world, "bert", {"tp": 2, "num_microbatches": 2})
    run_case(world, "hf-gpt2", {"tp": 2, "num_microbatches": 2})
    unsupported_plans(world)


def unsupported_plans(world: int) -> None:
    """Plans this runtime cannot execute fail by name, on every rank, before any work."""
    model, inputs, targets = build_case("gpt")
    probe = autopar.compile(copy.deepcopy(model), f"local:{world}", fix={"pp": 2, "num_microbatches": 2})
    probe.step(inputs, targets)
    vocab = dataclasses.replace(probe.plan, shardings=(autopar.plans.Sharding(node="wte", strategy="vocab"),))
    try:
        autopar.compile(model, f"local:{world}", plan=vocab).step(inputs, targets)
    except ValueError as err:
        assert "vocabulary-parallel" in str(err) and "pp > 1" in str(err), err
    else:
        raise AssertionError("a vocab sharding with pp > 1 must be refused")


def four_rank_matrix(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    run_case(world, "gpt", {"pp": 2, "dp": 2, "num_microbatches": 2})
    run_case(world, "gpt", {"pp": 2, "dp": 2, "num_microbatches": 2, "zero": 3, "recompute": "full"})
    run_case(world, "bert", {"pp": 2, "dp": 2, "num_microbatches": 2, "schedule": "gpipe"})
    run_case(world, "gpt", {"pp": 2, "tp": 2, "num_microbatches": 4})
    run_case(world, "gpt", {"dp": 2, "tp": 2, "num_microbatches": 2, "zero": 3})


def eight_rank_matrix(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    run_case(world, "gpt", {"pp": 2, "dp": 2, "tp": 2, "num_microbatches": 2})

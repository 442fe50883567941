"""Per-rank bodies of tests/distributed/test_sequence_parallel.py: Megatron sequence parallelism
(Korthikanti et al. 2022) on real gloo ranks against one process.

Each case trains a model under a hand-written Plan (Megatron's tensor-parallel layout plus
``sequence_parallel``) for 3 steps, compares every loss, gradient and parameter with plain PyTorch
in one process (fp32, the distributed matrix's tolerances), and asserts the transformation
happened: the norms see seq / tp tokens on each rank, and a forward issues reduce-scatters and
all-gathers where plain tensor parallelism issues all-reduces.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.utils._python_dispatch import TorchDispatchMode

import autopar
from tests.helpers.distributed.workers import HF_LAYERS, build_case, hand_written_plan, sgd, train_and_compare

SEQ, HIDDEN, HEADS, VOCAB, LAYERS = 16, 32, 4, 64, 2


class HandAttention(nn.Module):
    """Separate q/k/v linears and attention written by hand: softmax(QKᵀ/√d + causal mask)·V."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.out = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        d = h // HEADS
        q, k, v = (f(x).view(b, s, HEADS, d).transpose(1, 2)  # (b, a, s, d)
                   for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (b, a, s, s)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, s, h))  # (b, s, h)


class HandBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm_1, self.norm_2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.attn = HandAttention()
        self.up, self.down = nn.Linear(HIDDEN, 4 * HIDDEN), nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x))
        return x + self.down(F.gelu(self.up(self.norm_2(x))))


class HandGPT(nn.Module):
    """A GPT written without the zoo: learned positions from ``arange``, an untied LM head (left
    unsharded by Megatron's layout, so it runs on sequence shards and the logits are gathered)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(SEQ, HIDDEN)
        self.layers = nn.ModuleList(HandBlock() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        for norm in [m for m in self.modules() if isinstance(m, nn.LayerNorm)]:
            nn.init.normal_(norm.weight, 1.0, 0.1)  # not ones: their gradients then differ per entry
            nn.init.normal_(norm.bias, 0.0, 0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.size(1), device=ids.device))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def _case(name: str, seq: int = SEQ):
    if name == "handwritten":
        torch.manual_seed(0)
        model = HandGPT()
        ids = torch.randint(0, VOCAB, (8, seq), generator=torch.Generator().manual_seed(1))
        return model, ids, ids.roll(-1, dims=1)
    return build_case(name)


class SequenceProbe(TorchDispatchMode):
    """While entered, counts the functional collectives (``_c10d_functional`` ops) that DTensor
    issues, by name, and records the sequence length of each norm's local input on this rank.
    (torch's ``CommDebugMode`` counts the same collectives, but its module tracker fails on fx
    graphs that call one module twice, as the zoo GPT's shared dropout; and fx and torch.export
    graphs both reach ``native_layer_norm`` here, where one holds modules and the other does not.)"""

    COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_to_all_single",
                   "broadcast")

    NORMS = (torch.ops.aten.native_layer_norm.default,  # LayerNorm
             torch.ops.aten.rsqrt.default)  # RMSNorm written out: x · rsqrt(mean(x²) + ε)

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.norm_lengths: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if func.namespace in ("_c10d_functional", "c10d_functional") and name in self.COLLECTIVES:
            self.counts[name] = self.counts.get(name, 0) + 1
        if func in self.NORMS:
            x = args[0]
            self.norm_lengths.append((x.to_local() if isinstance(x, DTensor) else x).shape[1])
        return func(*args, **(kwargs or {}))


def run_sp_case(world: int, name: str, fix: dict, *, expected_forward: dict[str, int] | None = None) -> None:
    """Train ``name`` under ``fix`` with sequence parallelism, compare with one process, and check
    the sequence really was split (the forward's collectives checked when ``expected_forward``)."""
    fix = {**fix, "sequence_parallel": True}
    model, inputs, targets = _case(name)
    reference = copy.deepcopy(model)
    plan = hand_written_plan(model, inputs, world, fix)
    assert plan.sequence_parallel and plan.parallelism.tp == fix["tp"], plan.parallelism
    compiled = autopar.compile(model, f"local:{world}", plan=plan, optimizer=sgd)
    train_and_compare(compiled, reference, inputs, targets, (name, fix))
    engine = compiled.engine
    replicated = [(n, p) for n, p in engine.named_parameters() if p.placements[-1] == Replicate()]  # over tp
    assert replicated and all(p.grad.placements[-1] == Replicate() for _, p in replicated), \
        [(n, p.grad.placements) for n, p in replicated]  # norm weights' partial sums were reduced over tp
    seq, tp = inputs.shape[1], fix["tp"]
    micro = inputs[: plan.schedule.microbatch_size]
    for module in engine.modules if fix.get("pp", 1) == 1 else []:
        with SequenceProbe() as probe, torch.no_grad():
            module(micro)
        assert probe.norm_lengths and set(probe.norm_lengths) == {seq // tp}, (name, probe.norm_lengths)
        assert "all_reduce" not in probe.counts, probe.counts  # reduce-scatter + all-gather replace it
        if expected_forward is not None:
            assert probe.counts == expected_forward, (name, probe.counts, expected_forward)


def _pipeline_norms_sharded(world: int, fix: dict) -> None:
    """With pp the stages exchange whole hidden states; each stage splits them again: every norm of
    this rank's stages sees seq / tp tokens during a training step."""
    model, inputs, targets = _case("gpt")
    plan = hand_written_plan(model, inputs, world, {**fix, "sequence_parallel": True})
    compiled = autopar.compile(model, f"local:{world}", plan=plan, optimizer=sgd)
    compiled.step(inputs, targets)
    with SequenceProbe() as probe:
        compiled.step(inputs, targets)
    lengths = set(probe.norm_lengths)
    assert lengths == {inputs.shape[1] // fix["tp"]}, probe.norm_lengths
    assert "all_reduce" in probe.counts and probe.counts["reduce_scatter_tensor"] > 0, probe.counts


def indivisible_sequence(world: int) -> None:
    """A sequence that tp does not divide is refused by name, with the numbers and the fix."""
    model, inputs, targets = _case("handwritten", seq=15)
    plan = hand_written_plan(model, inputs, world, {"tp": world, "sequence_parallel": True})
    try:
        autopar.compile(model, f"local:{world}", plan=plan, optimizer=sgd).step(inputs, targets)
    except ValueError as err:
        message = str(err)
        assert all(part in message for part in (f"tp = {world}", "sequence length 15", "multiple of")), err
    else:
        raise AssertionError("a sequence of 15 tokens over tp = 2 must be refused")


def two_rank_sequence_parallel(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    # Forward of one microbatch: per layer two reduce-scatters (attention and MLP outputs) and two
    # all-gathers (q/k/v input, gathered once for three linears; MLP input); the vocabulary-parallel
    # embedding's reduce-scatter; the tied LM head's input all-gather and its vocabulary-split
    # logits' all-gather on the way out.
    run_sp_case(world, "gpt", {"tp": 2, "num_microbatches": 2}, expected_forward={
        "reduce_scatter_tensor": 2 * 4 + 1, "all_gather_into_tensor": 2 * 4 + 2})
    # The untied, unsharded head runs on sequence shards: the logits are gathered once, at the end.
    run_sp_case(world, "handwritten", {"tp": 2, "num_microbatches": 2}, expected_forward={
        "reduce_scatter_tensor": 2 * LAYERS + 1, "all_gather_into_tensor": 2 * LAYERS + 1})
    for mode in ("full", "selective"):  # recomputation replays the collectives and math attention
        run_sp_case(world, "gpt", {"tp": 2, "num_microbatches": 2, "recompute": mode})
    indivisible_sequence(world)
    two_rank_hf_sequence_parallel(rank, world)


def two_rank_hf_sequence_parallel(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    # Llama (torch.export graph: RMSNorm written out, SwiGLU, rotary positions, untied unsharded head):
    # q/k/v and gate/up gathered once each; the logits gathered on the way out.
    run_sp_case(world, "hf-llama", {"tp": 2, "num_microbatches": 2}, expected_forward={
        "reduce_scatter_tensor": 2 * HF_LAYERS + 1, "all_gather_into_tensor": 2 * HF_LAYERS + 1})
    # GPT-2's Conv1D runs addmm on flattened tokens: the shards sit on the views that restore
    # [batch, seq, hidden]; its tied head is column-parallel (input and logits gathered).
    run_sp_case(world, "hf-gpt2", {"tp": 2, "num_microbatches": 2}, expected_forward={
        "reduce_scatter_tensor": 2 * HF_LAYERS + 1, "all_gather_into_tensor": 2 * HF_LAYERS + 2})


def four_rank_sequence_parallel(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    fix = {"tp": 2, "pp": 2, "schedule": "1f1b", "num_microbatches": 4}
    run_sp_case(world, "gpt", fix)
    _pipeline_norms_sharded(world, fix)
    # FSDP2 (ZeRO-3) over dp × tp: it swaps the parameters (and the partial-gradient hook) for its
    # own and redistributes the norms' partial gradients itself.
    run_sp_case(world, "gpt", {"tp": 2, "dp": 2, "zero": 3, "num_microbatches": 2})


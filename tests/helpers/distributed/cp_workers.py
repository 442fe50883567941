"""Per-rank bodies of tests/distributed/test_context_parallel_runtime.py: context parallelism through
the Engine (issue 18), each case trained 3 steps under a hand-written Plan (``plan_from_fix``: the
planner does not search cp yet) and compared with one process (every loss, then every gradient and
parameter, fp32 at ``workers.RTOL``/``ATOL``), and each checking that the transformation happened:
every rank's attentions ran as ring attention on ``seq / cp`` tokens, and the ring issued exactly
the P2P exchanges that many attentions need (cp − 1 per forward, 2·cp − 1 per backward; a full
recomputation replays the forward, a selective one does not).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os

import torch
import torch.distributed as dist
from torch import nn

import autopar
from autopar.losses import cross_entropy
from autopar.passes import FusedAttention, MoE
from autopar.runtime.cp_rewrite import RECORD_KEY, ring_attention_modules
from tests.helpers.distributed import moe_workers
from tests.helpers.distributed.sequence_parallel_workers import SequenceProbe
from tests.helpers.distributed.workers import (
    ATOL,
    RTOL,
    STEPS,
    build_case,
    check_transformation,
    compare_parameters,
    full_tensor,
    hand_written_plan,
    reference_losses,
    sgd,
)

SEQ = 16


class HandAttention(nn.Module):
    """Causal self-attention written out: softmax(Q·Kᵀ/√d + mask)·V, the mask from the length."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(h // self.heads))
        mask = torch.tril(torch.ones(t, t, device=x.device))
        scores = scores.masked_fill(mask == 0, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v  # (b, heads, t, d)
        return self.proj(y.transpose(1, 2).reshape(b, t, h))


class HandBlock(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = HandAttention(hidden, heads)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class HandWrittenLM(nn.Module):
    """A user model with no SDPA: positions from ``arange``, hand-written causal attention, a tied
    LM head."""

    def __init__(self, vocab: int = 64, hidden: int = 32, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, hidden), nn.Embedding(SEQ, hidden)
        self.blocks = nn.ModuleList(HandBlock(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build(name: str):
    if name != "hand":
        return build_case(name)
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (8, SEQ), generator=torch.Generator().manual_seed(1))
    return HandWrittenLM(), ids, ids.roll(-1, dims=1)


class RingCounter:
    """Counts the P2P batches posted on the cp group (the ring's exchanges; pipeline sends travel
    on the pp group and are not counted) while entered."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group, self.calls, self._original = group, 0, dist.batch_isend_irecv

    def __enter__(self) -> RingCounter:
        def counted(ops):
            self.calls += all(op.group is self.group for op in ops)
            return self._original(ops)

        dist.batch_isend_irecv = counted
        return self

    def __exit__(self, *_: object) -> None:
        dist.batch_isend_irecv = self._original


def compiled_for(world: int, name: str, fix: dict, passes: tuple = ()):
    """The model compiled under the Plan the pins describe (no planner), its reference copy, the batch."""
    model, inputs, targets = build(name)
    reference = copy.deepcopy(model)
    plan = hand_written_plan(model, inputs, world, fix)
    if passes:  # the plan names the graph the passes make
        size = plan.schedule.microbatch_size
        micro = autopar.lower(model, inputs, passes=list(passes), microbatch_size=size)
        plan = dataclasses.replace(plan, graph_fingerprint=micro.fingerprint)
    compiled = autopar.compile(model, f"local:{world}", plan=plan, optimizer=sgd,
                               passes=list(passes) or None)
    return compiled, reference, inputs, targets


def run_cp_case(world: int, name: str, fix: dict, passes: tuple = ()) -> None:
    """Train 3 steps under ``fix`` and compare with one process; check the ring ran as planned."""
    compiled, reference, inputs, targets = compiled_for(world, name, fix, passes)
    cp, expected = fix["cp"], reference_losses(reference, inputs, targets)
    for step, want in enumerate(expected):
        if step == 0:  # the first step builds the engine (and, with pp, infers shapes)
            loss = compiled.step(inputs, targets)
            lengths = _record_lengths(compiled.engine.modules)
            calls = {id(m): m.num_calls for m in ring_attention_modules(_stages(compiled))}
        else:
            with RingCounter(compiled.engine.layout.group("cp")) as counter:
                loss = compiled.step(inputs, targets)
        assert math.isclose(loss, want, rel_tol=RTOL, abs_tol=ATOL), (name, fix, step, loss, want)
    compare_parameters(compiled.engine, reference, (name, fix))
    check_transformation(compiled.engine, reference, fix, {})
    _check_ring(compiled, fix, lengths, calls, counter.calls, seq=inputs.shape[1] // cp)
    with torch.no_grad():  # evaluation keeps its meaning: the loss of the whole sequence
        want = cross_entropy(reference.eval()(inputs), targets).item()
    assert math.isclose(compiled.evaluate(inputs, targets), want, rel_tol=RTOL, abs_tol=ATOL), want
    fused = {m.fused for m in ring_attention_modules(_stages(compiled))}
    assert fused == {bool(passes)}, fused  # the fused-attention pass's nodes were the ones replaced
    causal = {m.causal for m in ring_attention_modules(_stages(compiled))}
    assert causal == {name != "bert"}, causal  # BERT's bidirectional attention rings unmasked
    if fix.get("sequence_parallel"):
        _check_sequence_parallel(compiled, inputs, fix)


def _check_sequence_parallel(compiled, inputs, fix: dict) -> None:
    """With tp sequence parallelism inside each cp rank, norms see seq / (cp · tp) tokens and the
    forward reduce-scatters instead of all-reducing."""
    engine = compiled.engine
    micro = engine.sequence.shard(inputs[: engine.plan.schedule.microbatch_size])
    for module in engine.modules:
        with SequenceProbe() as probe, torch.no_grad():
            module(micro)
        assert set(probe.norm_lengths) == {inputs.shape[1] // (fix["cp"] * fix["tp"])}, probe.norm_lengths
        assert "all_reduce" not in probe.counts and probe.counts["reduce_scatter_tensor"] > 0, probe.counts


def _stages(compiled) -> nn.Module:
    return nn.ModuleList(compiled.engine.modules)


def _record_lengths(modules) -> list[int]:
    lengths: list[int] = []
    for module in modules:
        for ring in ring_attention_modules(module):
            ring.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[-2]))
    return lengths


def _check_ring(compiled, fix: dict, lengths: list[int], calls_before: dict, exchanges: int, *,
                seq: int) -> None:
    """Every attention of this rank's layers is a ring attention that saw ``seq`` (= seq/cp) tokens,
    and the last step's ring exchanges match its attention calls."""
    engine, cp = compiled.engine, fix["cp"]
    rings = ring_attention_modules(_stages(compiled))
    local_layers = sum(hi - lo for i in engine.stage_indices for lo, hi in [engine.plan.stages[i].layers])
    assert len(rings) == local_layers, (len(rings), local_layers)
    assert lengths and set(lengths) == {seq}, lengths
    record = compiled.captured.graph_module.meta.get(RECORD_KEY)
    assert record is None, "the capture itself must stay unchanged (compiled.module keeps its meaning)"
    micro = engine.plan.schedule.num_microbatches
    forwards = local_layers * micro * (2 if fix.get("recompute") == "full" else 1)  # per step
    calls = sum(m.num_calls - calls_before[id(m)] for m in rings)  # steps 2 and 3
    assert calls == 2 * forwards, (calls, forwards)
    backwards = local_layers * micro
    assert exchanges == forwards * (cp - 1) + backwards * (2 * cp - 1), (exchanges, forwards, backwards)


# Dropless and without auxiliary losses, top-2 routing is per token, so routing each cp rank's
# tokens separately equals routing the whole batch: one process is an exact reference.
MOE = MoE(num_experts=4, top_k=2, layers=(1, 3), dropless=True, aux_loss_weight=0.0, z_loss_weight=0.0,
          upcycle=False, seed=5)


def run_cp_moe(world: int, fix: dict) -> None:
    """cp with MoE layers: each rank's experts see its own seq/cp tokens; equal to one process."""
    case = dataclasses.replace(moe_workers.GPT, config=MOE, drops=False)
    model, inputs, targets = case.build()
    reference = copy.deepcopy(model)
    plan = moe_workers._plan(model, inputs, world, fix, case)
    compiled = autopar.compile(model, f"local:{world}", plan=plan, optimizer=sgd, passes=[MOE])
    losses = [compiled.step(inputs, targets) for _ in range(STEPS)]
    micro = plan.schedule.microbatch_size
    expected, params = moe_workers.reference_run(reference, inputs, targets, micro, case)
    for got, want in zip(losses, expected, strict=True):
        assert math.isclose(got, want, rel_tol=RTOL, abs_tol=ATOL), (fix, losses, expected)
    for name, param in compiled.engine.named_parameters():
        torch.testing.assert_close(full_tensor(param.detach()), params[name].detach(), rtol=RTOL, atol=ATOL)
    layers = compiled.engine.moe_layers()
    assert layers and {m.stats.tokens for m in layers} == {micro * inputs.shape[1] // fix["cp"]}, \
        [m.stats for m in layers]


def two_ranks(rank: int, world: int, folder: str) -> None:
    """cp2 on the zoo GPT, the hand-written model, HF Llama, BERT (non-causal, masked LM); cp2 with
    full and selective recomputation, and with the fused-attention pass; then a checkpoint saved under
    cp2 loads under cp1 (in the same processes: start-up costs more than a case)."""
    torch.set_num_threads(1)
    run_cp_case(world, "gpt", {"cp": 2, "num_microbatches": 2})
    run_cp_case(world, "hand", {"cp": 2, "num_microbatches": 2})
    run_cp_case(world, "hf-llama", {"cp": 2, "num_microbatches": 2})
    run_cp_case(world, "bert", {"cp": 2, "num_microbatches": 2})
    run_cp_case(world, "gpt", {"cp": 2, "num_microbatches": 2, "recompute": "full"})
    run_cp_case(world, "gpt", {"cp": 2, "num_microbatches": 2, "recompute": "selective"})
    run_cp_case(world, "gpt", {"cp": 2, "num_microbatches": 2}, passes=(FusedAttention(),))
    checkpoint_cp2_to_cp1(rank, world, folder)


def four_ranks(rank: int, world: int) -> None:
    """cp2 × pp2 (1F1B and zero-bubble), cp2 × dp2 with ZeRO-3, cp2 × tp2 with sequence parallelism,
    cp2 × dp2 with MoE layers over ep2."""
    torch.set_num_threads(1)
    for schedule in ("1f1b", "zero_bubble"):
        run_cp_case(world, "gpt", {"cp": 2, "pp": 2, "schedule": schedule, "num_microbatches": 4})
    run_cp_case(world, "gpt", {"cp": 2, "dp": 2, "zero": 3, "num_microbatches": 2})
    run_cp_case(world, "gpt", {"cp": 2, "tp": 2, "sequence_parallel": True, "num_microbatches": 2})
    run_cp_moe(world, {"cp": 2, "dp": 2, "ep": 2, "num_microbatches": 2})


def checkpoint_cp2_to_cp1(rank: int, world: int, folder: str) -> None:
    """A checkpoint saved under cp2 (pinned, the rest planned: the user's path) loads under dp2
    (cp 1): the same parameters, and both continue with the same loss."""
    torch.set_num_threads(1)
    path = os.path.join(folder, "cp2")
    model, inputs, targets = build("gpt")
    compiled = autopar.compile(model, f"local:{world}", fix={"cp": 2, "num_microbatches": 2}, optimizer=sgd)
    for _ in range(2):
        compiled.step(inputs, targets)
    autopar.save(compiled, path)
    saved = {n: full_tensor(p).detach().clone() for n, p in compiled.engine.named_parameters()}
    resumed, _, _, _ = compiled_for(world, "gpt", {"dp": 2, "num_microbatches": 2})
    autopar.load(resumed, path, example_inputs=inputs)
    for fqn, param in resumed.engine.named_parameters():
        torch.testing.assert_close(full_tensor(param).detach(), saved[fqn], rtol=0, atol=0)
    assert resumed.plan.parallelism.cp == 1 and compiled.plan.parallelism.cp == 2
    assert ring_attention_modules(_stages(compiled)) and not ring_attention_modules(_stages(resumed))
    assert abs(resumed.step(inputs, targets) - compiled.step(inputs, targets)) <= 1e-5

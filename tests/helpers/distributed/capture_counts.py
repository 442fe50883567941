"""Per-rank body of the capture-count test: a planned multi-process compile of a user model
(hand-written attention and MLP, not from the zoo) captures it at most twice per rank and runs
each pass once per capture."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

import autopar
from autopar.passes import RandomLTD

LOWER = importlib.import_module("autopar.lower")  # the module; autopar.lower is the function


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        attn = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Embedding(64, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Counting:
    """Counts captures (``capture`` as ``autopar.lower`` calls it) and applications of one pass."""

    def __init__(self, graph_pass: RandomLTD) -> None:
        self.captures = self.passes = 0
        original_capture, original_apply = LOWER.capture, type(graph_pass).apply

        def capture(*args, **kwargs):
            self.captures += 1
            return original_capture(*args, **kwargs)

        def apply(pass_self, gm, ctx):
            self.passes += 1
            return original_apply(pass_self, gm, ctx)

        LOWER.capture = capture
        type(graph_pass).apply = apply


def planned_compile_counts(rank: int, world: int) -> None:
    ltd = RandomLTD(min_tokens=8, num_steps=4, layers=(1, 2))
    counts = Counting(ltd)
    for fix in ({"microbatch_size": 4}, None):  # the planner's microbatch differs from the batch; free
        counts.captures = counts.passes = 0
        torch.manual_seed(0)
        inputs, targets = torch.randint(0, 64, (8, 16)), torch.randint(0, 64, (8, 16))
        compiled = autopar.compile(TinyLM(), f"local:{world}", passes=[ltd], fix=fix, time_limit_s=30)
        for _ in range(2):
            compiled.step(inputs, targets)
        micro = compiled.plan.schedule.microbatch_size
        expected = 1 if rank or micro == inputs.shape[0] else 2
        assert fix is None or micro == 4
        assert counts.captures == compiled.num_lowered == expected, (rank, fix, counts.captures, micro)
        assert counts.passes == counts.captures, (fix, counts.passes, counts.captures)

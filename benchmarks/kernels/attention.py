"""Fused attention on a GPU: autopar's FlashAttention-2 Triton kernels (Dao 2023) against SDPA's
flash backend and unfused PyTorch, forward, backward and both, in TFLOP/s.

Data flow: ``autopar.kernels.flash_attention`` (the op the fused-attention pass substitutes) →
this driver → a table on stdout and ``benchmarks/results/kernels_attention.json`` / ``.md``
(device, versions, commit). Run: ``.venv/bin/python -m benchmarks.kernels.attention``.
Without a CUDA GPU it prints "no GPU: not measured" and exits 0 — no numbers are made up.

Cases as in the FlashAttention-2 paper: head dim 64 and 128, sequence 512 … 16k, causal or not,
batch × sequence = 16k tokens, hidden 2048 (heads = 2048 / head dim), bf16. FLOPs (TECHNIQUES
§8): forward ``4·s²·d·heads·batch`` (half when causal), backward 2.5× forward. The timing is
``triton.testing.do_bench``'s median. Target on H100: autopar ≥ 0.9× SDPA-flash forward+backward.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parents[1] / "results"
NAME = "kernels_attention"
IMPLEMENTATIONS = ("autopar", "sdpa_flash", "unfused")
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def unfused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Attention as eager PyTorch writes it: (b, h, s, s) scores, fp32 softmax, two matmuls."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _implementation(name: str) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from autopar.kernels import flash_attention

    if name == "autopar":
        return lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)
    if name == "sdpa_flash":
        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return sdpa
    return unfused_attention


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> float:
    return 4.0 * seq * seq * head_dim * heads * batch * (0.5 if causal else 1.0)


def bench_case(name: str, *, seq: int, head_dim: int, causal: bool, tokens: int, hidden: int,
               dtype: torch.dtype) -> dict[str, Any]:
    """One implementation on one shape: ms and TFLOP/s per mode (None where it ran out of memory)."""
    from triton.testing import do_bench

    batch, heads = max(1, tokens // seq), hidden // head_dim
    fn = _implementation(name)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype, generator=g)
               .requires_grad_() for _ in range(3))
    row: dict[str, Any] = dict(implementation=name, seq=seq, head_dim=head_dim, causal=causal, batch=batch,
                               heads=heads, dtype=str(dtype).removeprefix("torch."))
    flops = attention_flops(batch, heads, seq, head_dim, causal)
    try:
        out = fn(q, k, v, causal)
        grad = torch.randn_like(out)
        timings = {
            "fwd": do_bench(lambda: fn(q, k, v, causal)),
            "bwd": do_bench(lambda: out.backward(grad, retain_graph=True), grad_to_none=[q, k, v]),
            "fwd+bwd": do_bench(lambda: fn(q, k, v, causal).backward(grad), grad_to_none=[q, k, v]),
        }
    except torch.cuda.OutOfMemoryError:
        timings = dict.fromkeys(MODES)
    finally:
        torch.cuda.empty_cache()
    for mode, ms in timings.items():
        row[f"{mode}_ms"] = None if ms is None else round(ms, 4)
        row[f"{mode}_tflops_per_s"] = None if ms is None else round(FLOP_FACTOR[mode] * flops / ms / 1e9, 2)
    return row


def check_agreement(*, head_dim: int, causal: bool, dtype: torch.dtype) -> float:
    """Max |autopar − SDPA| on a small case, so a fast wrong kernel cannot pass unnoticed."""
    q, k, v = (torch.randn(2, 4, 1000, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    diff = _implementation("autopar")(q, k, v, causal) - _implementation("sdpa_flash")(q, k, v, causal)
    return diff.abs().max().item()


def environment() -> dict[str, Any]:
    import triton

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "python": platform.python_version(), "autopar_commit": commit}


def table(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [f"# fused attention ({env['device']}, torch {env['torch']}, triton {env['triton']}, "
             f"commit {env['autopar_commit']})", "",
             "| impl | d | seq | causal | batch×heads | fwd TFLOP/s | bwd TFLOP/s | fwd+bwd TFLOP/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r[f"{m}_tflops_per_s"] for m in MODES]
        shown = ["OOM" if c is None else f"{c:.1f}" for c in cells]
        lines.append(f"| {r['implementation']} | {r['head_dim']} | {r['seq']} | {r['causal']} | "
                     f"{r['batch']}×{r['heads']} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS),
                        choices=IMPLEMENTATIONS)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=16384, help="batch × sequence")
    parser.add_argument("--hidden", type=int, default=2048, help="heads × head dim")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: not measured (this benchmark times CUDA kernels; run it on a machine with a GPU)")
        return 0
    dtype = getattr(torch, args.dtype)
    env = environment()
    rows, agreement = [], {}
    shape = dict(tokens=args.tokens, hidden=args.hidden, dtype=dtype)
    for head_dim in args.head_dims:
        for causal in (False, True):
            diff = check_agreement(head_dim=head_dim, causal=causal, dtype=dtype)
            agreement[f"d{head_dim}_causal{causal}"] = diff
            for seq in args.seqs:
                for name in args.implementations:
                    rows.append(bench_case(name, seq=seq, head_dim=head_dim, causal=causal, **shape))
                    print(rows[-1], file=sys.stderr)
    env["max_abs_diff_vs_sdpa"] = agreement
    text = table(rows, env)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{NAME}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
        (RESULTS / f"{NAME}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fallbacks: without the interpreter (or a GPU), without Triton, on ``meta`` tensors and for
shapes the kernel does not cover, ``flash_attention`` runs ``scaled_dot_product_attention``
with the same semantics; ``supports``/``unsupported_reason`` say why. The GPU benchmark measures
nothing without a GPU."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from autopar.kernels import attention_reference, flash_attention, supports, unsupported_reason


def _qkv(h=4, hk=2, s=9, d=16):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, heads, s, d, generator=g) for heads in (h, hk, hk))


def test_cpu_without_interpreter_runs_sdpa(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v = _qkv()
    mask = torch.rand(9, 9, generator=torch.Generator().manual_seed(1)) > 0.2
    assert not supports(q, k, v)
    assert "TRITON_INTERPRET" in unsupported_reason(q, k, v)
    out = flash_attention(q, k, v, causal=True, attn_mask=mask)  # GQA, causal and a mask at once
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True, attn_mask=mask))
    want = F.scaled_dot_product_attention(q, q, q, scale=0.5)
    torch.testing.assert_close(flash_attention(q, q, q, scale=0.5), want)


def test_uncovered_inputs_fall_back_with_a_reason():
    q, k, v = _qkv(d=272)
    assert "head_dim 272" in unsupported_reason(q, k, v)
    torch.testing.assert_close(flash_attention(q, k, v), attention_reference(q, k, v))
    q64 = q[..., :16].double()
    assert "dtypes" in unsupported_reason(q64, q64, q64)
    assert "dropout_p" in unsupported_reason(*_qkv(), dropout_p=1.0)
    meta = torch.empty(1, 2, 4, 16, device="meta")
    assert "meta" in unsupported_reason(meta, meta, meta)
    assert flash_attention(meta, meta, meta).shape == (1, 2, 4, 16)


def test_autopar_imports_and_attends_without_triton():
    """A process where ``import triton`` fails: autopar imports, flash_attention runs SDPA."""
    script = """
import sys
sys.modules["triton"] = None  # import triton raises ImportError, as if it were not installed
import os; os.environ["TRITON_INTERPRET"] = "1"
import torch, autopar
from autopar.kernels import flash_attention, unsupported_reason
q = torch.randn(1, 2, 5, 16)
assert unsupported_reason(q, q, q) == "Triton is not installed", unsupported_reason(q, q, q)
want = torch.nn.functional.scaled_dot_product_attention(q, q, q)
torch.testing.assert_close(flash_attention(q, q, q), want)
assert sys.modules["triton"] is None
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_gpu_benchmark_says_not_measured_without_a_gpu(monkeypatch, capsys):
    path = Path(__file__).parents[2] / "benchmarks" / "kernels" / "attention.py"
    spec = importlib.util.spec_from_file_location("attention_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert benchmark.main([]) == 0
    assert "no GPU: not measured" in capsys.readouterr().out

"""The FlashAttention-2 kernels (Triton interpreter) against the plain-PyTorch reference:
random shapes with odd lengths, causal or not, grouped-query heads, boolean/additive/padding
masks, fp32/fp16/bf16, forward and gradients; fully masked rows; dropout replayed exactly."""

import math

import pytest
import torch
import torch.nn.functional as F

from autopar.kernels import attention_reference, flash_attention, supports

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

# One tolerance table, compared with the fp32 reference on the same (rounded) inputs. fp32 is
# exact up to summation order. fp16/bf16 round P to the input dtype before P·V and dS before
# dS·K, as FlashAttention-2 does: about one ulp of the dtype at the outputs' magnitude (~1).
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}

# (batch, heads, kv_heads, seq_q, seq_k, head_dim, causal, mask, dtype)
CASES = [
    (1, 2, 2, 16, 16, 16, False, None, torch.float32),
    (2, 4, 2, 37, 29, 24, True, None, torch.float32),
    (1, 2, 1, 20, 33, 40, False, "bool", torch.float32),
    (2, 2, 2, 19, 19, 16, True, "padding", torch.float32),
    (1, 3, 3, 17, 5, 64, False, "additive", torch.float32),
    (1, 4, 1, 9, 41, 32, True, "additive", torch.float16),
    (2, 2, 2, 33, 18, 80, False, "bool", torch.float16),
    (1, 2, 1, 23, 23, 48, True, "padding", torch.bfloat16),
    (1, 1, 1, 7, 12, 128, False, None, torch.bfloat16),
    (1, 1, 1, 5, 9, 256, True, None, torch.float32),
]


def _inputs(b, h, hk, sq, sk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g).to(dtype).transpose(1, 2)  # strided, as HF passes it
    k = torch.randn(b, hk, sk, d, generator=g).to(dtype)
    v = torch.randn(b, hk, sk, d, generator=g).to(dtype)
    return q, k, v


def _mask(kind, b, h, sq, sk, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        keep = torch.rand(h, sq, sk, generator=g) > 0.3
        keep[..., 0] = True
        return keep
    if kind == "padding":  # (b, 1, 1, sk) key padding, additive with finfo.min like Hugging Face
        pad = torch.zeros(b, 1, 1, sk)
        pad[0, ..., sk // 2:] = torch.finfo(torch.float32).min
        return pad
    if kind == "additive":
        return torch.randn(b, 1, sq, sk, generator=g)
    return None


def _grads(fn, tensors, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_forward_and_gradients_match_reference(case):
    b, h, hk, sq, sk, d, causal, mask_kind, dtype = case
    q, k, v = _inputs(b, h, hk, sq, sk, d, dtype)
    mask = _mask(mask_kind, b, h, sq, sk)
    assert supports(q, k, v, mask)
    grad_out = torch.randn(b, h, sq, d, generator=torch.Generator().manual_seed(2))
    out, grads = _grads(lambda *t: flash_attention(*t, causal=causal, attn_mask=mask), (q, k, v), grad_out)
    ref, ref_grads = _grads(lambda *t: attention_reference(*t, causal=causal, attn_mask=mask),
                            (q.float(), k.float(), v.float()), grad_out)
    assert out.dtype == dtype and out.shape == (b, h, sq, d)
    torch.testing.assert_close(out.float(), ref, **TOLERANCE[dtype])
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.float(), want, **TOLERANCE[dtype], msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("bias_shape", [(1, 2, 13, 21), (2, 1, 1, 21), (13, 21)])
def test_learned_additive_mask_gets_its_gradient(bias_shape):
    """T5's position bias is an additive mask that trains: dMask = dS summed over broadcast dims."""
    q, k, v = _inputs(2, 2, 2, 13, 21, 16, torch.float32)
    bias = torch.randn(bias_shape)
    grad_out = torch.randn(2, 2, 13, 16)
    out, grads = _grads(lambda *t: flash_attention(*t[:3], attn_mask=t[3], causal=True),
                        (q, k, v, bias), grad_out)
    ref, ref_grads = _grads(lambda *t: attention_reference(*t[:3], attn_mask=t[3], causal=True),
                            (q, k, v, bias), grad_out)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])
    assert grads[3].shape == bias.shape
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


def test_fully_masked_rows_follow_sdpa():
    """A row whose keys are all masked: 0 with a boolean or −inf mask, uniform with finfo.min
    (what Hugging Face's additive masks give in eager softmax) — as SDPA does."""
    q, k, v = _inputs(1, 2, 2, 11, 18, 16, torch.float32)
    keep = torch.ones(11, 18, dtype=torch.bool)
    keep[3] = False
    masks = [keep, torch.zeros(11, 18).masked_fill(~keep, -math.inf),
             torch.zeros(11, 18).masked_fill(~keep, torch.finfo(torch.float32).min)]
    grad_out = torch.randn(1, 2, 11, 16)
    for mask in masks:
        out, grads = _grads(lambda *t, m=mask: flash_attention(*t, attn_mask=m), (q, k, v), grad_out)
        ref, ref_grads = _grads(lambda *t, m=mask: F.scaled_dot_product_attention(*t, attn_mask=m),
                                (q, k, v), grad_out)
        torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])
    assert out[0, :, 3].abs().sum() > 0  # finfo.min: uniform, not zero


def test_scale_and_three_dim_inputs():
    q, k, v = _inputs(1, 3, 3, 14, 10, 16, torch.float32)
    out = flash_attention(q[0], k[0], v[0], scale=0.3, causal=True)
    ref = attention_reference(q[0], k[0], v[0], scale=0.3, causal=True)
    assert out.shape == (3, 14, 16)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


def test_dropout_keeps_one_minus_p_and_backward_replays_the_same_pattern():
    """With V = I the output is P∘Z/(1−p) itself, exposing the kernel's keep pattern Z; a second
    call with the same torch seed draws the same Philox seed, so forward and gradients can be
    compared with the reference replaying Z."""
    p, s = 0.3, 32
    q, k, _ = _inputs(2, 2, 2, s, s, s, torch.float32)
    identity = torch.eye(s).expand(2, 2, s, s)
    torch.manual_seed(7)
    dropped = flash_attention(q, k, identity, dropout_p=p)
    keep = dropped != 0
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    v = torch.randn(2, 2, s, s)
    grad_out = torch.randn(2, 2, s, s)
    torch.manual_seed(7)
    out, grads = _grads(lambda *t: flash_attention(*t, dropout_p=p), (q, k, v), grad_out)
    ref, ref_grads = _grads(lambda *t: attention_reference(*t, dropout_p=p, dropout_keep=keep),
                            (q, k, v), grad_out)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])
    torch.manual_seed(8)
    assert not torch.equal(flash_attention(q, k, identity, dropout_p=p) != 0, keep)


@pytest.mark.parametrize("seq_q, seq_k, head_dim, causal", [(150, 130, 64, True), (70, 97, 128, False)])
def test_gpu_block_sizes_compute_the_same(monkeypatch, seq_q, seq_k, head_dim, causal):
    """The GPU launch settings (128/64-wide tiles) run here through the interpreter, with tails."""
    from autopar.kernels import flash_bwd_kv, flash_bwd_q, flash_common, flash_fwd

    def gpu_config(d, *, interpreted, kind):
        c = flash_common.launch_config(d, interpreted=False, kind=kind)
        return flash_common.LaunchConfig(c.block_m, c.block_n, c.block_d, 1, 1)

    for module in (flash_fwd, flash_bwd_kv, flash_bwd_q):
        monkeypatch.setattr(module, "launch_config", gpu_config)
    q, k, v = _inputs(1, 2, 1, seq_q, seq_k, head_dim, torch.float32)
    bias = torch.randn(1, 1, seq_q, seq_k)
    grad_out = torch.randn(1, 2, seq_q, head_dim)
    out, grads = _grads(lambda *t: flash_attention(*t[:3], attn_mask=t[3], causal=causal),
                        (q, k, v, bias), grad_out)
    ref, ref_grads = _grads(lambda *t: attention_reference(*t[:3], attn_mask=t[3], causal=causal),
                            (q, k, v, bias), grad_out)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])

"""Single-process calibration measurements: one operation at a time, one thread, as a rank runs.

Data flow: ``calibrate.calibrate`` → :func:`measure_single_process` → raw points (no fits) →
``calibrate_fits`` → ``LocalProfile`` / ``CpuRates``. Each ``measure_*`` is the measured twin of
a cost-model function: ``compute.matmul_time_s`` (cold operands), ``CpuRates.linear_s``
(``nn.Linear`` forward + backward), ``CpuRates.flash_attention_s`` and ``math_attention_s``,
``CpuRates.elementwise_s`` (a training op forward, and forward + backward), ``CpuRates.optimizer_s``
(AdamW) and ``cpu_compute.transformer_layer_part`` (a zoo GPT block, used to check the others).

Timing follows ``timeit`` — the fastest of several repeats — on the thread's CPU clock
(``time.thread_time``): a rank's work on its own core, which other users of a shared machine do
not inflate by taking the core away (they still slow caches and memory; the cores they kept busy
are recorded, :func:`others_busy_cores`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 2**20
COLD_WORKING_SET_BYTES = 96 * MIB
"""Operand bytes a cold matmul cycles through: beyond this machine's ~32–64 MB of effective cache
(a large copy slows from ~28 to ~14 GB/s between 32 and 64 MB here)."""


def cpu_seconds(pids: Sequence[int] = ()) -> tuple[float, float, float] | None:
    """(wall clock, CPU-seconds all cores were busy since boot, CPU-seconds used by ``pids``) from
    Linux's /proc; None elsewhere."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        mine = 0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            mine += int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    tick_s = 1 / os.sysconf("SC_CLK_TCK")
    return time.monotonic(), (sum(ticks) - ticks[3] - ticks[4]) * tick_s, mine * tick_s


def others_busy_cores(since: tuple[float, float, float] | None, pids: Sequence[int] = ()) -> float | None:
    """Cores kept busy by processes other than ``pids`` since ``since`` (other users' load)."""
    now = cpu_seconds(pids)
    if since is None or now is None:
        return None
    return max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / max(now[0] - since[0], 1e-9)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the body with one intra-op thread, as each runtime rank does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fastest_s(fn: Callable[[], Any], *, repeats: int, inner: int = 1,
              clock: Callable[[], float] = time.thread_time) -> float:
    """Seconds per call of ``fn`` on ``clock``: one warm-up, then the fastest of ``repeats``
    × ``inner`` calls."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = clock()
        for _ in range(inner):
            fn()
        best = min(best, (clock() - start) / inner)
    return best


def measure_matmul_time_s(m: int, k: int, n: int, *, dtype: str = "fp32", repeats: int = 3,
                          pool: torch.Tensor | None = None) -> float:
    """Measured twin of ``compute.matmul_time_s``: one (m×k)(k×n) matmul. With ``pool`` (a flat
    tensor larger than the caches) each call takes fresh operands from it, so they come from
    memory."""
    size = m * k + k * n + m * n
    if pool is None:
        pool = torch.ones(size, dtype=_TORCH_DTYPES[dtype])
    assert pool.dtype == _TORCH_DTYPES[dtype] and pool.numel() >= size
    wanted = math.ceil(COLD_WORKING_SET_BYTES / (size * pool.element_size()))  # beyond the caches
    sets = [pool[i * size:(i + 1) * size] for i in range(max(1, min(wanted, pool.numel() // size)))]
    views = [(x[:m * k].view(m, k), x[m * k:size - m * n].view(k, n), x[size - m * n:].view(m, n))
             for x in sets]
    rounds = max(1, int(2e7 / (m * k * n * len(views))))

    def cycle() -> None:
        for a, b, out in views:
            torch.mm(a, b, out=out)

    return fastest_s(cycle, repeats=repeats, inner=rounds) / len(views)


def measure_memory_time_s(num_bytes: int, *, repeats: int = 3) -> float:
    """Measured twin of ``compute.memory_time_s``: a copy that reads and writes ``num_bytes`` in all."""
    src = torch.ones(max(1, num_bytes // 8))
    dst = torch.empty_like(src)
    return fastest_s(lambda: dst.copy_(src), repeats=repeats)


def measure_elementwise_time_s(num_elements: int, *, repeats: int = 3) -> float:
    """An add, a scaled copy and a GELU on fp32 tensors of ``num_elements``: 7 element passes."""
    x, y = torch.randn(num_elements), torch.randn(num_elements)
    return fastest_s(lambda: F.gelu(torch.add(x, y).mul_(0.5)), repeats=repeats, inner=5)


def measure_op_overhead_s(*, repeats: int = 3) -> float:
    """Dispatch time of one tiny op (a 1-element add): the per-op floor of eager PyTorch on CPU."""
    x = torch.ones(1)
    return fastest_s(lambda: torch.add(x, x), repeats=repeats, inner=2000)


def measure_training_op_overhead_s(*, repeats: int = 3, num_ops: int = 100) -> float:
    """Per op, forward and backward through autograd, of a chain of tiny (1-element) multiplies."""
    x = torch.ones(1, requires_grad=True)

    def chain() -> None:
        y = x
        for _ in range(num_ops):
            y = y * 1.0
        y.backward()

    return fastest_s(chain, repeats=repeats) / num_ops


def measure_train_time_s(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor,
                         params: Sequence[torch.Tensor] = (), repeats: int = 3) -> tuple[float, float]:
    """(forward, forward + backward) seconds of ``fn(*inputs)`` as training runs it: autograd
    records the forward, the backward takes a fixed output gradient, gradients start empty."""
    grad = torch.randn_like(fn(*inputs))

    def train() -> None:
        for tensor in (*inputs, *params):
            tensor.grad = None
        fn(*inputs).backward(grad)

    return fastest_s(lambda: fn(*inputs), repeats=repeats), fastest_s(train, repeats=repeats)


def measure_linear_time_s(m: int, k: int, n: int, *, repeats: int = 3) -> float:
    """Measured twin of ``CpuRates.linear_s``: ``nn.Linear(k, n)`` (with bias) on ``m`` rows,
    forward and backward."""
    linear = torch.nn.Linear(k, n)
    x = torch.randn(m, k, requires_grad=True)
    return measure_train_time_s(linear, x, params=tuple(linear.parameters()), repeats=repeats)[1]


def _op_inputs(op: str, num_elements: int) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...],
                                                    tuple[torch.Tensor, ...]]:
    """The training op ``op`` of ``CpuRates.elementwise`` on about ``num_elements`` output elements."""
    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, requires_grad=True)

    def rows(width: int) -> int:
        return max(1, num_elements // width)

    if op == "layer_norm":
        norm = torch.nn.LayerNorm(256)
        return norm, (leaf(rows(256), 256),), tuple(norm.parameters())
    if op == "gelu":
        return F.gelu, (leaf(rows(1024), 1024),), ()
    if op == "add":
        return torch.add, (leaf(num_elements), leaf(num_elements)), ()
    if op == "copy":  # the attention output's head merge: (b, a, s, d) → (b, s, a·d)
        b = rows(8 * 128 * 32)
        return (lambda x: x.transpose(1, 2).reshape(b, 128, 256)), (leaf(b, 8, 128, 32),), ()
    if op == "cross_entropy":  # fp32 logits over an 8192-word vocabulary, summed
        target = torch.randint(0, 8192, (rows(8192),))
        return (lambda z: F.cross_entropy(z, target, reduction="sum")), (leaf(rows(8192), 8192),), ()
    raise ValueError(f"unknown training op {op!r}")


def measure_op_time_s(op: str, num_elements: int, *, repeats: int = 3) -> tuple[float, float, int]:
    """Measured twin of ``CpuRates.elementwise_s``: (forward s, forward + backward s, elements) of
    ``op`` on about ``num_elements`` elements (the exact count its shapes allow)."""
    fn, inputs, params = _op_inputs(op, num_elements)
    fwd, train = measure_train_time_s(fn, *inputs, params=params, repeats=repeats)
    return fwd, train, inputs[0].numel()


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, *, causal: bool = True) -> float:
    """Forward FLOPs of fused attention as ``compute`` counts them (causal: half)."""
    return 4 * batch * seq * seq * heads * head_dim * (0.5 if causal else 1.0)


def measure_attention_time_s(batch: int, heads: int, seq: int, head_dim: int, *, backend: str = "flash",
                             repeats: int = 3) -> tuple[float, float]:
    """Measured twin of ``CpuRates.flash_attention_s`` / ``math_attention_s``: causal SDPA in fp32
    on the ``flash`` (default CPU) or ``math`` backend; (forward, forward + backward) seconds."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(batch, heads, seq, head_dim, requires_grad=True) for _ in range(3))
    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[backend]
    def attention(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)

    with sdpa_kernel([chosen]):
        return measure_train_time_s(attention, q, k, v, repeats=repeats)


def measure_transformer_layer_time_s(batch: int, seq: int, hidden: int, heads: int, *, num_layers: int = 1,
                                     repeats: int = 3) -> float:
    """Measured twin of ``cpu_compute.transformer_layer_part`` (forward + backward): blocks of the
    zoo GPT (pre-LN, fused causal attention, GELU MLP of 4h) in fp32, eager; with ``num_layers``
    > 1 a stack of them, per layer — in a stack the backward finds its saved activations evicted
    from the caches by the layers after it, as in training."""
    from autopar.models.configs import GPTConfig
    from autopar.models.gpt import Block

    torch.manual_seed(0)
    config = GPTConfig(num_layers=1, hidden_size=hidden, num_heads=heads, seq_len=seq, vocab_size=8)
    stack = torch.nn.Sequential(*[Block(config) for _ in range(num_layers)])
    x = torch.randn(batch, seq, hidden, requires_grad=True)
    return measure_train_time_s(stack, x, params=tuple(stack.parameters()), repeats=repeats)[1] / num_layers


def measure_optimizer_time_s(num_params: int, *, tensor_numel: int = 256 * 1024, repeats: int = 3) -> float:
    """Measured twin of ``CpuRates.optimizer_s``: the runtime's default AdamW over ``num_params``
    fp32 parameters in tensors of ``tensor_numel``."""
    count = max(1, num_params // tensor_numel)
    params = [torch.nn.Parameter(torch.randn(tensor_numel)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
    return fastest_s(optimizer.step, repeats=repeats)

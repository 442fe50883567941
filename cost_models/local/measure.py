"""Time-bounded measurements of single operations on this CPU, one thread, as a runtime rank runs.

Data flow: :func:`quick_measurements` (a few seconds, one process) → ``rates.CpuRates.quick`` — the
rates that price a local plan when ``autopar calibrate`` has saved no profile; the same
primitives serve ``autopar calibrate`` (``autopar.calibration.ops``, which adds the cold-operand
matmuls, transformer blocks and a spawned gloo group). Each ``measure_*`` is the measured twin
of a cost-model function: ``CpuRates.linear_s`` (``nn.Linear`` forward + backward),
``flash_attention_s`` / ``math_attention_s`` (causal SDPA), ``elementwise_s`` (a training op
forward, and forward + backward), ``copy_s``, ``optimizer_s`` (AdamW), the DTensor dispatch
overheads and ``collective_time_s`` (gloo).

Every measurement is bounded by TIME, never by a repeat count: :func:`timed_s` runs one warm-up
call, then calls again until its ``seconds`` (wall clock) are spent — at least one timed call —
and keeps the median, timed on the thread's CPU clock (``time.thread_time``): a rank's work on
its own core, which other users of a shared machine do not inflate by taking the core away. A
single call longer than its whole slot is kept as the measurement.

In-process stand-ins for what the full calibration measures across processes (quick path only):
the gloo collectives of ``n`` ranks run on ``n`` threads of this process, each with its own
``ProcessGroupGloo`` over an in-memory store (gloo runs outside the GIL); DTensor dispatch on a
one-rank mesh of this process (no communication involved). How processes share the cores is
measured with ``n`` processes forked from this one (:func:`measure_shares_in_processes`: threads
of one process serialise where ranks do not).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

MIB = 2**20
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
"""/proc/cpuinfo flags under which oneDNN runs a dtype's matmuls natively; without them torch
converts (AVX-512) or falls back to a scalar reference loop (AVX2 only: 100–1000× slower)."""
EMULATED_ENV = "AUTOPAR_EMULATED_DTYPES"
"""Comma-separated dtypes to treat as emulated whatever the CPU says (``bf16,fp16``; testing the
bounded path on a CPU that has them)."""


# --- timing ---------------------------------------------------------------------------------------
def timed_s(fn: Callable[[], Any], *, seconds: float, inner: int = 1,
            clock: Callable[[], float] = time.thread_time) -> float:
    """Seconds per call of ``fn`` on ``clock``: one warm-up call, then batches of ``inner`` calls
    until ``seconds`` of wall clock have passed since the start (at least one batch), the MEDIAN
    batch per call. A warm-up that alone took the whole slot is the measurement.

    The median, not the fastest batch: a training step runs each operation once among many others,
    so it sees an operation's typical time, and the fastest of many batches is systematically
    optimistic (measured on a 2-core KVM Xeon: nn.Linear 256×256×768 fwd+bwd fastest 2.23 ms,
    median 2.37 ms; AdamW fastest 30.5 ms, median 31.6 ms)."""
    start = time.perf_counter()
    before = clock()
    fn()
    warm = clock() - before
    if time.perf_counter() - start >= seconds:
        return warm
    batches: list[float] = []
    while True:
        before = clock()
        for _ in range(inner):
            fn()
        batches.append((clock() - before) / inner)
        if time.perf_counter() - start >= seconds:
            return statistics.median(batches)


def timed_rounds_s(fns: Sequence[Callable[[], Any]], *, seconds: float, rounds: int = 3,
                   clock: Callable[[], float] = time.thread_time) -> list[float]:
    """Seconds per call of each of ``fns``, measured round-robin: one untimed warm-up call each,
    then ``rounds`` passes over them, each fn timed (calls until its share of the pass is spent, at
    least one, the median call) in every pass; per fn the median over the passes.

    Why round-robin: this VM's speed drifts by ~10 % over seconds (MEASURED: one nn.Linear shape
    22.0–25.9 ms in six consecutive processes, and within one), and measured one after another the
    shapes of a curve each meet another moment of it, which the fit then reads as the curve's shape
    (two calibrations 55 min apart fitted the nn.Linear roll-off at 16 and 32)."""
    for fn in fns:
        fn()
    share = seconds / max(1, rounds * len(fns))
    passes: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, times in zip(fns, passes, strict=True):
            start, calls = time.perf_counter(), []
            while not calls or time.perf_counter() - start < share:
                before = clock()
                fn()
                calls.append(clock() - before)
            times.append(statistics.median(calls))
    return [statistics.median(times) for times in passes]


def timed_pair_s(first: Callable[[], Any], second: Callable[[], Any], *, seconds: float,
                 clock: Callable[[], float] = time.thread_time, warm_up: bool = True) -> tuple[float, float]:
    """Seconds per call of ``first`` and of ``second``, called in alternation for ``seconds``
    (after one untimed warm-up call each, unless ``warm_up`` is False): the median of ``first``,
    and that times the median ratio of each ``second`` call to the ``first`` call beside it. A
    difference of the two (a stack's extra cost over its block alone) then holds the pair's
    difference, not the machine's drift between two measurements taken apart
    (:func:`timed_rounds_s`)."""
    if warm_up:
        first()
        second()
    start, firsts, ratios = time.perf_counter(), [], []
    while not firsts or time.perf_counter() - start < seconds:
        before = clock()
        first()
        middle = clock()
        second()
        firsts.append(middle - before)
        ratios.append((clock() - middle) / max(middle - before, 1e-12))
    alone = statistics.median(firsts)
    return alone, alone * statistics.median(ratios)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the body with one intra-op thread, as each runtime rank does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- what this CPU runs natively ------------------------------------------------------------------
def cpu_flags() -> frozenset[str]:
    """The ``flags`` of /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def emulated_dtypes() -> dict[str, str]:
    """``{dtype: why}`` for the low-precision dtypes this CPU emulates: no native matmul flag
    (:data:`NATIVE_FLAGS`), or named in ``$AUTOPAR_EMULATED_DTYPES``."""
    forced = {d.strip() for d in os.environ.get(EMULATED_ENV, "").split(",") if d.strip()}
    flags, capability = cpu_flags(), torch.backends.cpu.get_cpu_capability()
    found = {}
    for dtype, needed in NATIVE_FLAGS.items():
        if dtype in forced:
            found[dtype] = f"treated as emulated (${EMULATED_ENV})"
        elif flags and not flags & set(needed):
            found[dtype] = (f"this CPU ({capability}) has none of {'/'.join(needed)}: torch emulates "
                            f"{dtype} matmuls")
    return found


# --- single operations ----------------------------------------------------------------------------
def measure_train_time_s(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor,
                         params: Sequence[torch.Tensor] = (), seconds: float) -> tuple[float, float]:
    """(forward, forward + backward) seconds of ``fn(*inputs)`` as training runs it: autograd
    records the forward, the backward takes a fixed output gradient, gradients start empty; half
    of ``seconds`` each."""
    grad = torch.randn_like(fn(*inputs))

    def train() -> None:
        for tensor in (*inputs, *params):
            tensor.grad = None
        fn(*inputs).backward(grad)

    return timed_s(lambda: fn(*inputs), seconds=seconds / 2), timed_s(train, seconds=seconds / 2)


def linear_work(m: int, k: int, n: int) -> Callable[[], None]:
    """``nn.Linear(k, n)`` (with bias) on ``m`` rows, forward and backward, one call."""
    linear = torch.nn.Linear(k, n)
    x = torch.randn(m, k, requires_grad=True)
    grad = torch.randn(m, n)

    def train() -> None:
        for tensor in (x, *linear.parameters()):
            tensor.grad = None
        linear(x).backward(grad)

    return train


def measure_linear_time_s(m: int, k: int, n: int, *, seconds: float) -> float:
    """Measured twin of ``CpuRates.linear_s``: ``nn.Linear(k, n)`` (with bias) on ``m`` rows,
    forward and backward."""
    return timed_s(linear_work(m, k, n), seconds=seconds)


def measure_linear_curve_s(shapes: Sequence[tuple[int, int, int]], *, seconds: float, rounds: int = 3
                           ) -> list[float]:
    """:func:`measure_linear_time_s` of every shape, measured round-robin (:func:`timed_rounds_s`)
    within ``seconds`` in all: the points the nn.Linear curve is fitted to."""
    return timed_rounds_s([linear_work(m, k, n) for m, k, n in shapes], seconds=seconds, rounds=rounds)


def measure_memory_time_s(num_bytes: int, *, seconds: float) -> float:
    """Measured twin of ``CpuRates.copy_s``: a copy that reads and writes ``num_bytes`` in all."""
    src = torch.ones(max(1, num_bytes // 8))
    dst = torch.empty_like(src)
    return timed_s(lambda: dst.copy_(src), seconds=seconds)


def ring_block_point(batch: int, heads: int, seq: int, head_dim: int, *, causal: bool, seconds: float
                     ) -> dict[str, Any]:
    """:func:`measure_ring_block_s` as the raw point ``rates.ring_block_points`` reads: the shape,
    its score count (the causal own block ``b·heads·s²``, a half block ``b·heads·s·s/2``) and the
    forward and backward seconds."""
    fwd, bwd = measure_ring_block_s(batch, heads, seq, head_dim, causal=causal, seconds=seconds)
    return {"batch": batch, "heads": heads, "seq": seq, "head_dim": head_dim, "causal": causal,
            "scores": batch * heads * seq * (seq if causal else max(1, seq // 2)), "forward_s": fwd,
            "backward_s": bwd}


FRESH_PROBE_BYTES = 64 * MIB
"""Beyond glibc's largest dynamic mmap threshold (32 MiB on 64-bit Linux), so every allocation of
this size is new mapped memory."""


def measure_fresh_page_s_per_byte(*, seconds: float, num_bytes: int = FRESH_PROBE_BYTES) -> float:
    """Measured twin of ``CpuRates.fresh_s``: what writing a NEW tensor of ``num_bytes`` costs per
    byte beyond writing one that exists (its pages fault in on first touch: torch's CPU allocator
    keeps no cache, and glibc maps an allocation this large afresh each time). MEASURED on a 2-core
    KVM Xeon: 0.24–0.31 ns per byte from 40 to 128 MiB (a 134 MB logits tensor: +35 ms), nothing
    at 24 MiB and below; never negative."""
    count = max(1, num_bytes // 4)
    existing = torch.empty(count)
    existing.fill_(0.0)
    reused = timed_s(lambda: existing.fill_(1.0), seconds=seconds / 2)
    fresh = timed_s(lambda: torch.empty(count).fill_(1.0), seconds=seconds / 2)
    return max(0.0, fresh - reused) / (4 * count)


def measure_training_op_overhead_s(*, seconds: float, num_ops: int = 100) -> float:
    """Per op, forward and backward through autograd, of a chain of tiny (1-element) multiplies."""
    x = torch.ones(1, requires_grad=True)

    def chain() -> None:
        y = x
        for _ in range(num_ops):
            y = y * 1.0
        y.backward()

    return timed_s(chain, seconds=seconds) / num_ops


def op_inputs(op: str, num_elements: int) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...],
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


def measure_op_time_s(op: str, num_elements: int, *, seconds: float) -> tuple[float, float, int]:
    """Measured twin of ``CpuRates.elementwise_s``: (forward s, forward + backward s, elements) of
    ``op`` on about ``num_elements`` elements (the exact count its shapes allow)."""
    fn, inputs, params = op_inputs(op, num_elements)
    fwd, train = measure_train_time_s(fn, *inputs, params=params, seconds=seconds)
    return fwd, train, inputs[0].numel()


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, *, causal: bool = True) -> float:
    """Forward FLOPs of fused attention as ``compute`` counts them (causal: half)."""
    return 4 * batch * seq * seq * heads * head_dim * (0.5 if causal else 1.0)


def measure_attention_time_s(batch: int, heads: int, seq: int, head_dim: int, *, backend: str = "flash",
                             seconds: float) -> tuple[float, float]:
    """Measured twin of ``CpuRates.flash_attention_s`` / ``math_attention_s``: causal SDPA in fp32
    on the ``flash`` (default CPU) or ``math`` backend; (forward, forward + backward) seconds."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(batch, heads, seq, head_dim, requires_grad=True) for _ in range(3))
    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[backend]

    def attention(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)

    with sdpa_kernel([chosen]):
        return measure_train_time_s(attention, q, k, v, seconds=seconds)


def measure_ring_block_s(batch: int, heads: int, seq: int, head_dim: int, *, causal: bool, seconds: float
                         ) -> tuple[float, float]:
    """Measured twin of ``CpuRates.ring_block_s``: one step of ring attention's torch block kernel
    on this rank (``autopar.kernels.ring_blocks``, fp32), as ``runtime/context_parallel`` runs it.
    ``causal``: the own step, ``seq`` local queries against their own ``seq`` keys under the
    causal mask; else an unmasked block of ``seq`` queries against ``seq / 2`` keys (a zigzag
    ring's other steps). Forward: the block and its log-sum-exp merge into the running output;
    backward: the block's backward (it recomputes the scores) and the dQ and dK/dV accumulation.
    (forward, backward) seconds."""
    from autopar.kernels.ring_blocks import TORCH_BLOCK_ATTENTION, merge_partial_attention

    keys = seq if causal else max(1, seq // 2)
    q, dout = torch.randn(batch, heads, seq, head_dim), torch.randn(batch, heads, seq, head_dim)
    k, v = torch.randn(batch, heads, keys, head_dim), torch.randn(batch, heads, keys, head_dim)
    out, lse = torch.zeros(q.shape), torch.full(q.shape[:-1], float("-inf"))
    scale = head_dim ** -0.5
    block_out, block_lse = TORCH_BLOCK_ATTENTION.forward(q, k, v, causal=causal, scale=scale)
    dq, dkv = torch.zeros(q.shape), torch.zeros((2, *k.shape))

    def forward() -> None:
        part_out, part_lse = TORCH_BLOCK_ATTENTION.forward(q, k, v, causal=causal, scale=scale)
        out[:], lse[:] = merge_partial_attention(out, lse, part_out, part_lse)

    def backward() -> None:
        grads = TORCH_BLOCK_ATTENTION.backward(dout, q, k, v, block_out, block_lse, causal=causal,
                                               scale=scale)
        dq.add_(grads[0])
        dkv[0].add_(grads[1])
        dkv[1].add_(grads[2])

    return timed_s(forward, seconds=seconds / 2), timed_s(backward, seconds=seconds / 2)


def measure_optimizer_time_s(num_params: int, *, tensor_numel: int = 256 * 1024, seconds: float,
                             wrap: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Measured twin of ``CpuRates.optimizer_s``: the runtime's default AdamW over ``num_params``
    fp32 parameters in tensors of ``tensor_numel`` (each passed through ``wrap``, e.g. into a
    DTensor)."""
    wrap = wrap or (lambda t: t)
    count = max(1, num_params // tensor_numel)
    params = [torch.nn.Parameter(wrap(torch.randn(tensor_numel))) for _ in range(count)]
    for p in params:
        p.grad = wrap(torch.randn(tensor_numel))
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
    optimizer.step()  # the first step allocates the moments: not what a training step pays
    return timed_s(optimizer.step, seconds=seconds)


# --- DTensor, in this process ---------------------------------------------------------------------
@contextlib.contextmanager
def _one_rank_mesh() -> Iterator[Any]:
    """A device mesh of this process alone (no communication): over the process group this process
    is in, else over a one-rank gloo group made for the measurement and destroyed after it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield DeviceMesh("cpu", torch.tensor([dist.get_rank()]), _init_backend=False)
    finally:
        if made:
            dist.destroy_process_group()


def measure_dtensor_overhead_s(*, seconds: float, num_ops: int = 50, num_tensors: int = 64,
                               mesh: Any = None) -> dict[str, float]:
    """Per-op DTensor dispatch (forward + backward of a tiny multiply, replicated minus plain) and
    the extra AdamW time of DTensor parameters, per tensor and per element (tensors of 256 and of
    65,536 elements); thread CPU time, no communication involved. Without ``mesh``, on a one-rank
    mesh of this process."""
    if mesh is None:
        with _one_rank_mesh() as own:
            return measure_dtensor_overhead_s(seconds=seconds, num_ops=num_ops, num_tensors=num_tensors,
                                              mesh=own)
    from torch.distributed.tensor import DTensor, Replicate

    def chain(x: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            y = x
            for _ in range(num_ops):
                y = y * 1.0
            y.sum().backward()
        return run

    def replicated(t: torch.Tensor) -> torch.Tensor:
        return DTensor.from_local(t, mesh, [Replicate()])

    part = seconds / 6
    plain = torch.ones(4, requires_grad=True)
    shared = replicated(torch.ones(4)).requires_grad_(True)
    per_op = (timed_s(chain(shared), seconds=part) - timed_s(chain(plain), seconds=part)) / num_ops

    def extra_per_tensor(numel: int, count: int) -> float:
        wrapped = measure_optimizer_time_s(count * numel, tensor_numel=numel, seconds=part, wrap=replicated)
        return (wrapped - measure_optimizer_time_s(count * numel, tensor_numel=numel, seconds=part)) / count

    small, large = 256, 65536  # the extra grows with the tensor: two sizes give per tensor and per element
    at_small, at_large = extra_per_tensor(small, num_tensors), extra_per_tensor(large, num_tensors // 4)
    per_param = max(0.0, (at_large - at_small) / (large - small))
    return {"dispatch_s": max(per_op, 0.0), "optimizer_s_per_param": per_param,
            "optimizer_s_per_tensor": max(at_small - small * per_param, 0.0)}


# --- several ranks, as threads of this process ----------------------------------------------------
def _on_threads(num: int, work: Callable[[int], Any]) -> list[Any]:
    """``work(i)`` on ``num`` threads at once; their results in order (the first error re-raised)."""
    results: list[Any] = [None] * num
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = work(i)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(num)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def measure_gloo_in_threads(num_ranks: int, sizes: Sequence[int], *, seconds: float,
                            kinds: Sequence[str], timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Stand-in for ``autopar calibrate``'s gloo group: each collective of ``kinds`` (p2p only for
    2 ranks) on each full-buffer size, among ``num_ranks`` gloo ranks on threads of this process;
    ``seconds`` shared by the points. Per point, the median repeat of the slowest rank (wall
    clock; p2p: half a round trip)."""
    import torch.distributed as dist

    store = dist.HashStore()
    groups = _on_threads(num_ranks, lambda r: dist.ProcessGroupGloo(
        dist.PrefixStore("autopar-quick", store), r, num_ranks, datetime.timedelta(seconds=timeout_s)))
    points = [(kind, size) for kind in kinds if kind != "p2p" or num_ranks == 2 for size in sizes]
    slot = seconds / max(1, len(points))
    barrier, shared = threading.Barrier(num_ranks), {}

    def rank(r: int) -> list[float]:
        times = []
        for kind, size in points:
            call = _collective_call(groups[r], kind, size, rank=r, num_ranks=num_ranks)
            times.append(_slowest_rank_s(call, r, barrier, slot, shared) / (2 if kind == "p2p" else 1))
        return times

    measured = _on_threads(num_ranks, rank)[0]
    return [{"kind": kind, "num_ranks": num_ranks, "size_bytes": size, "time_s": t}
            for (kind, size), t in zip(points, measured, strict=True)]


def _collective_call(group: Any, kind: str, size_bytes: int, *, rank: int, num_ranks: int
                     ) -> Callable[[], None]:
    """One ``kind`` on a full buffer of ``size_bytes`` by ``rank`` of ``group`` (p2p: a round trip
    between ranks 0 and 1, the lower one sending first). A gather or scatter writes a fresh output
    each call, as the runtime's (DTensor's functional collectives, FSDP2's): beyond glibc's largest
    mmap threshold (32 MiB) every such output is new memory whose pages fault in (MEASURED on 2
    gloo processes, 2-core KVM Xeon: a 128 MiB all-gather 235 ms into a reused output, 289 ms into
    a fresh one)."""
    full = torch.ones(max(num_ranks, size_bytes // 4 // num_ranks * num_ranks))
    part = torch.ones(full.numel() // num_ranks)
    if kind == "all_reduce":
        return lambda: group.allreduce([full]).wait()
    if kind == "all_gather":  # into a fresh output, as the runtime's functional collectives do
        return lambda: group._allgather_base(torch.empty_like(full), part).wait()
    if kind == "reduce_scatter":
        return lambda: group._reduce_scatter_base(torch.empty_like(part), full).wait()
    if kind != "p2p":
        raise ValueError(f"unknown collective kind {kind!r}; expected all_reduce, all_gather, "
                         "reduce_scatter or p2p")

    def round_trip() -> None:
        for sending in ((True, False) if rank == 0 else (False, True)):
            (group.send if sending else group.recv)([full], 1 - rank, 0).wait()

    return round_trip


def _slowest_rank_s(call: Callable[[], None], rank: int, barrier: threading.Barrier, seconds: float,
                    shared: dict[str, Any]) -> float:
    """The MEDIAN repeat of the slowest rank (a step sees a collective's typical time, as
    ``autopar calibrate``'s ``group._slowest_rank_s``); rank 0 decides, after each repeat, whether
    the ``seconds`` are spent (every rank runs the same number of repeats)."""
    call()
    start, repeats = time.perf_counter(), []
    while True:
        barrier.wait()
        begin = time.perf_counter()
        call()
        shared[f"t{rank}"] = time.perf_counter() - begin
        barrier.wait()
        if rank == 0:
            shared["done"] = time.perf_counter() - start >= seconds
        repeats.append(max(shared[f"t{r}"] for r in range(barrier.parties)))
        barrier.wait()
        if shared["done"]:
            return statistics.median(repeats)


def gpt_stack_work(batch: int, seq: int, hidden: int, heads: int, num_layers: int = 4,
                    num_microbatches: int = 1, *, forward_only: bool = False) -> Callable[[], None]:
    """One training step's compute over a stack of zoo GPT blocks (pre-LN, fused causal attention,
    GELU MLP of 4h; fp32, eager): as the runtime's GPipe runs a stage, the forward of
    ``num_microbatches`` microbatches of ``batch`` sequences, then their backward, gradients
    accumulating across microbatches (cleared once per call). ``forward_only``: the forwards alone,
    their activations saved for a backward that does not come (all microbatches' held together,
    then dropped)."""
    from autopar.models.configs import GPTConfig
    from autopar.models.gpt import Block

    torch.manual_seed(0)
    config = GPTConfig(num_layers=1, hidden_size=hidden, num_heads=heads, seq_len=seq, vocab_size=8)
    stack = torch.nn.Sequential(*[Block(config) for _ in range(num_layers)])
    xs = [torch.randn(batch, seq, hidden, requires_grad=True) for _ in range(num_microbatches)]
    grad = torch.randn(batch, seq, hidden)

    def train() -> None:
        for p in (*stack.parameters(), *xs):
            p.grad = None
        outputs = [stack(x) for x in xs]
        if forward_only:
            return
        for output in outputs:
            output.backward(grad)

    return train


def measure_gpt_stack_pair_s(batch: int, seq: int, hidden: int, heads: int, *, num_layers: int,
                             num_microbatches: int, seconds: float, forward_only: bool = False
                             ) -> tuple[float, float]:
    """(a block alone, the block in a stack of ``num_layers`` over ``num_microbatches``), seconds
    per layer and microbatch, measured in alternation (:func:`timed_pair_s`) for ``seconds``: a
    quarter as many calls of the block alone as the stack runs layer-microbatches, then one of the
    stack (after one warm-up call of each)."""
    units = num_layers * num_microbatches
    calls = max(1, units // 4)
    block = gpt_stack_work(batch, seq, hidden, heads, 1, 1, forward_only=forward_only)
    stack = gpt_stack_work(batch, seq, hidden, heads, num_layers, num_microbatches, forward_only=forward_only)

    def blocks() -> None:
        for _ in range(calls):
            block()

    block()
    stack()
    alone, stacked = timed_pair_s(blocks, stack, seconds=seconds, warm_up=False)
    return alone / calls, stacked / units


def measure_gpt_stack_time_s(batch: int, seq: int, hidden: int, heads: int, *, num_layers: int = 1,
                             num_microbatches: int = 1, seconds: float, forward_only: bool = False) -> float:
    """Measured twin of ``compute.transformer_layer_part`` (forward + backward), per layer and
    microbatch: :func:`gpt_stack_work`. With one layer and one microbatch, a block alone; in a
    stack over several microbatches, the backward finds its saved activations evicted from the
    caches by the layers and microbatches after it, as in training."""
    work = gpt_stack_work(batch, seq, hidden, heads, num_layers, num_microbatches, forward_only=forward_only)
    return timed_s(work, seconds=seconds) / (num_layers * num_microbatches)


QUICK_LAYER_SHAPE = (2, 128, 128, 4)
"""(batch, seq, hidden, heads) of the quick path's GPT blocks: the share measurement's work, and
the block timed alone and as 4 microbatches through 4 layers."""
SHARE_WINDOWS = 3


def _share_child(work_name: str, window: float, barrier: Any, results: Any, index: int) -> None:
    """One forked process of :func:`measure_shares_in_processes`: :data:`SHARE_WINDOWS` windows of
    ``window`` seconds, each opened by a barrier with the others, running ``work_name``'s work;
    reports (calls per wall second, per CPU second) of each window."""
    torch.set_num_threads(1)
    if work_name == "copy":
        src = torch.ones(2 * MIB)
        dst = torch.empty_like(src)
        work: Callable[[], Any] = lambda: dst.copy_(src)  # noqa: E731
    else:
        work = gpt_stack_work(*QUICK_LAYER_SHAPE)
    work()
    rates = []
    for _ in range(SHARE_WINDOWS):
        barrier.wait()
        done, start, cpu = 0, time.perf_counter(), time.thread_time()
        while done == 0 or time.perf_counter() - start < window:
            work()
            done += 1
        rates.append((done / (time.perf_counter() - start), done / max(time.thread_time() - cpu, 1e-9)))
    results.put((index, rates))


def _run_share(context: Any, work_name: str, n: int, window: float) -> tuple[float, float]:
    """(wall, CPU) rate per process of ``n`` processes running ``work_name`` at once: per clock,
    the window whose mean over the processes is best (other users' load only slows a window
    down)."""
    barrier, results = context.Barrier(n), context.SimpleQueue()
    children = [context.Process(target=_share_child, args=(work_name, window, barrier, results, i),
                                daemon=True) for i in range(n)]
    for child in children:
        child.start()
    windows = [rates for _, rates in (results.get() for _ in children)]
    for child in children:
        child.join(timeout=30)
    means = [(statistics.fmean(w[i][0] for w in windows), statistics.fmean(w[i][1] for w in windows))
             for i in range(SHARE_WINDOWS)]
    return max(m[0] for m in means), max(m[1] for m in means)


def measure_shares_in_processes(counts: Sequence[int], *, seconds: float) -> list[tuple[int, float, float]]:
    """``(n, compute, copy)`` for ``n`` in ``counts`` (and 1): the rate of each of ``n`` PROCESSES
    (forked from this one, one thread each, started together by a barrier) relative to one process
    alone — compute on a stack of GPT blocks (the training op mix) per CPU second times
    ``min(1, cores/n)`` (time slicing beyond the cores), as ``calibration.fits.compute_shares``
    computes it; copy on a large copy per wall second. ``seconds`` shared by the windows.

    Processes, not threads: measured on a 2-core KVM Xeon, two threads of one process running
    ``torch.mm`` got 0.49–0.50 of one thread's rate each, while two processes running the zoo GPT's
    training steps each ran as fast as one alone (0.553 and 0.556 s per step vs 0.573 s alone):
    threads of one process serialise where the runtime's ranks do not."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    cores = os.cpu_count() or 1
    numbers = sorted(set(counts) | {1})
    window = seconds / max(1, 2 * len(numbers) * SHARE_WINDOWS)
    compute = {n: _run_share(context, "compute", n, window)[1] for n in numbers}
    copy = {n: _run_share(context, "copy", n, window)[0] for n in numbers}
    return [(n, min(1.0, compute[n] / compute[1] * min(1.0, cores / n)), min(1.0, copy[n] / copy[1]))
            for n in numbers]


# --- the quick built-in measurement ---------------------------------------------------------------
QUICK_LINEAR_SHAPES = ((128, 256, 256), (256, 512, 512), (512, 1024, 1024))
QUICK_ATTENTION_SHAPES = ((4, 8, 128, 32), (2, 8, 256, 64))
QUICK_OP_ELEMENTS = (2**16, 2**20)
QUICK_CROSS_ENTROPY_ELEMENTS = (2**18, 2**21)
QUICK_COLLECTIVE_BYTES = (4096, 256 * 1024, 4 * MIB, 64 * MIB)
QUICK_COLLECTIVE_RANKS = (2, 4)
QUICK_SYNC_REPEATS = (1, 8)
QUICK_OPTIMIZER = ((256 * 1024, 32), (4096, 64))  # (tensor numel, tensors); 8 Mi parameters: beyond caches


def quick_measurements(*, ops: Sequence[str], kinds: Sequence[str], seconds: float = 3.0,
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Everything the quick rates need, measured in about ``seconds`` (one process, one thread;
    several ranks as threads, module docstring): the training ``ops`` and collective ``kinds``
    the rates tabulate (``rates.ELEMENTWISE_OPS``, ``COLLECTIVE_KINDS``); raw points, no fits."""
    say = progress or (lambda _: None)
    s = seconds / 3.0  # the slots below add up to about 3.75 s
    start = time.perf_counter()
    with one_thread():
        cores = os.cpu_count() or 1  # processes forked first, before any gloo thread exists
        # as many processes as local plans run ranks (QUICK_COLLECTIVE_RANKS), beyond the cores too:
        # 4 ranks on a 2-core KVM Xeon each compute at 0.43-0.47 of one alone (MEASURED), not 2/4
        shares = measure_shares_in_processes(QUICK_COLLECTIVE_RANKS, seconds=0.5 * s)
        say("core sharing")
        sync_waits = measure_sync_waits_in_processes(QUICK_COLLECTIVE_RANKS, seconds=1.5 * s,
                                                     repeats=QUICK_SYNC_REPEATS)
        sync_waits += measure_sync_waits_in_processes(QUICK_COLLECTIVE_RANKS, seconds=0.75 * s,
                                                      repeats=QUICK_SYNC_REPEATS, kind="p2p")
        say("collectives and ring exchanges after compute")
        linear = [{"m": m, "k": k, "n": n, "time_s": measure_linear_time_s(m, k, n, seconds=0.06 * s)}
                  for m, k, n in QUICK_LINEAR_SHAPES]
        attention = []
        for b, a, seq, d in QUICK_ATTENTION_SHAPES:
            fwd, both = measure_attention_time_s(b, a, seq, d, seconds=0.08 * s)
            attention.append({"batch": b, "heads": a, "seq": seq, "head_dim": d, "forward_s": fwd,
                              "forward_backward_s": both})
        b, a, seq, d = QUICK_ATTENTION_SHAPES[0]
        fwd, both = measure_attention_time_s(b, a, seq, d, backend="math", seconds=0.06 * s)
        math_attention = {"scores": b * a * seq * seq, "forward_s": fwd, "train_s": both}
        ring_blocks = [ring_block_point(b, a, seq, d, causal=causal, seconds=0.06 * s)
                       for causal in (True, False)]
        say("nn.Linear, attention")
        op_points = []
        for op in ops:
            for n in QUICK_CROSS_ENTROPY_ELEMENTS if op == "cross_entropy" else QUICK_OP_ELEMENTS:
                fwd, both, elements = measure_op_time_s(op, n, seconds=0.03 * s)
                op_points.append({"op": op, "elements": elements, "forward_s": fwd, "train_s": both})
        copy_bytes = 64 * MIB
        copy_s = measure_memory_time_s(copy_bytes, seconds=0.05 * s)
        fresh = measure_fresh_page_s_per_byte(seconds=0.06 * s)
        overhead_s = measure_training_op_overhead_s(seconds=0.05 * s)
        optimizer = [{"tensor_numel": numel, "num_tensors": count,
                      "time_s": measure_optimizer_time_s(numel * count, tensor_numel=numel, seconds=0.05 * s)}
                     for numel, count in QUICK_OPTIMIZER]
        b, seq, h, a = QUICK_LAYER_SHAPE
        stack = {"num_layers": 4, "num_microbatches": 4}
        layer = {"batch": b, "seq": seq, "hidden": h, "heads": a,
                 "time_s": measure_gpt_stack_time_s(b, seq, h, a, seconds=0.08 * s),
                 "forward_time_s": measure_gpt_stack_time_s(b, seq, h, a, seconds=0.04 * s,
                                                            forward_only=True),
                 "stacked_time_s": measure_gpt_stack_time_s(b, seq, h, a, **stack, seconds=0.15 * s),
                 "stacked_forward_time_s": measure_gpt_stack_time_s(b, seq, h, a, **stack, seconds=0.08 * s,
                                                                    forward_only=True)}
        say("elementwise ops, copy, autograd overhead, AdamW, GPT blocks")
        dtensor = measure_dtensor_overhead_s(seconds=0.2 * s)
        collectives = [p for n in QUICK_COLLECTIVE_RANKS for p in measure_gloo_in_threads(
            n, QUICK_COLLECTIVE_BYTES, seconds=0.55 * s, kinds=kinds)]
        say("DTensor dispatch, gloo collectives")
    return {"linear": linear, "attention": attention, "math_attention": math_attention, "ops": op_points,
            "copy": {"bytes": copy_bytes, "time_s": copy_s, "fresh_page_s_per_byte": fresh},
            "training_op_overhead_s": overhead_s,
            "optimizer": optimizer, "dtensor": dtensor, "collectives": collectives, "shares": shares,
            "sync_waits": sync_waits, "ring_blocks": ring_blocks,
            "transformer_layer": [layer],
            "num_cores": cores, "seconds": round(time.perf_counter() - start, 2)}


# --- collectives as a training step meets them ------------------------------------------------------
SYNC_REPEATS = (1, 6, 36)
"""Work between two collectives in :func:`measure_sync_waits`, in calls of the GPT-block work
(:data:`SYNC_LAYER_SHAPE`, about 3 ms on a 2-core Xeon): from a few milliseconds (a
tensor-parallel layer's collectives) to about a hundred (a stage's microbatch)."""
SYNC_LAYER_SHAPE = (2, 64, 128, 4)
SYNC_BYTES = (4096, 4 * MIB)


def _per_call_s(calls: int, fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure_sync_waits(work: Callable[[], Any], *, group_sizes: Sequence[int], seconds: float,
                       sizes: Sequence[int] = SYNC_BYTES, repeats: Sequence[int] = SYNC_REPEATS,
                       processes: int | None = None, ranks: GlooRanks | None = None,
                       kind: str = "all_reduce") -> list[dict[str, Any]]:
    """The measured twin of ``CpuRates.sync_wait_s``: what a gloo all-reduce adds to an iteration
    of ``work`` on every rank, as a training step meets its collectives. Every rank of ``ranks``
    (the default process group when None) must call it; its first ``processes`` ranks (default:
    all) are busy at once, in disjoint groups of each size in ``group_sizes`` (dividing
    ``processes``), the others idle.

    Per (group size, work between collectives, message size): ``free`` = mean over the busy ranks
    of an iteration of ``work`` alone (``interval_s``); ``in_step_s`` = the mean over the busy ranks
    of the seconds an iteration spends inside the collective when it follows the work, timed around
    the call in the same iterations (``loop_s`` = the slowest rank's iteration minus ``free``, kept
    for reference: a difference of two loops timed seconds apart, which the machine's speed drift
    spoils — COUNTED on a 2-core KVM AMD EPYC: the same work ran 79.7 then 92.8 ms per iteration a
    few seconds apart, and such differences came out from −8 to +17 ms at 35–240 ms of work).
    Beyond the collective alone (``collective_s``, the slowest rank's median call after a barrier,
    kept for reference), it holds the arrival skew of ranks that drift apart while they share cores
    and caches and the wake-up of a rank that blocked in the collective: on a 2-core KVM AMD EPYC
    about 2–5 ms per collective among 2 processes, 3–20 ms among 4 on the 2 cores (while a rank
    waits, the others use its core: ``shared_cores``' blocked waits). Bounded by ``seconds``:
    iteration counts follow from the slowest rank's timing of one call, and a longer ``repeats``
    level runs only while time is left (rank 0 decides for all). ``kind="p2p"``: instead of the
    all-reduce, the pair exchange of ring attention's hops (a send to and a receive from the other
    rank, groups of 2 only), which gloo moves in its transport thread (``CpuRates.exchange_waits``);
    points carry their ``kind``."""
    if kind not in ("all_reduce", "p2p"):
        raise ValueError(f"kind = {kind!r}: expected 'all_reduce' or 'p2p'")
    ranks = ranks or GlooRanks.default()
    world, rank = ranks.size, ranks.rank
    processes = world if processes is None else processes
    busy = rank < processes
    if busy:
        work()  # warm-up
    unit = max(ranks.every(_per_call_s(2, work) if busy else 0.0))
    stretch = max(1.0, processes / (os.cpu_count() or 1))
    configs = [g for g in sorted(set(group_sizes)) if 2 <= g <= processes and processes % g == 0
               and (kind == "all_reduce" or g == 2)]
    slot = seconds / max(1, len(configs) * len(repeats))
    start, points = time.perf_counter(), []
    for g in configs:
        groups = [ranks.subgroup(list(range(i, i + g))) for i in range(0, processes, g)]
        mine = groups[rank // g] if busy else None
        for reps in repeats:  # the shortest work first; a longer one only while time is left
            calls = max(3, int(slot / ((1 + len(sizes)) * reps * unit * stretch)))
            if reps > repeats[0] and ranks.every(time.perf_counter() - start)[0] > seconds:  # rank 0 decides
                break
            points += _sync_points(work, reps, calls, sizes, ranks=ranks, group=mine, busy=busy,
                                   labels={"num_processes": processes, "group_size": g}, kind=kind)
    return points


class GlooRanks:
    """The ranks of a gloo process group, driven through the group object itself (so a process
    forked from a rank, which inherits its default group's bookkeeping, can run its own group):
    barriers, every rank's value of a float, and subgroups of some of the ranks."""

    def __init__(self, group: Any, *, rank: int, size: int,
                 subgroup: Callable[[list[int]], Any]) -> None:
        self.group, self.rank, self.size, self._subgroup = group, rank, size, subgroup

    @classmethod
    def default(cls) -> GlooRanks:
        """The default process group (``torch.distributed`` initialised)."""
        import torch.distributed as dist

        return cls(dist.distributed_c10d._get_default_group(), rank=dist.get_rank(),
                   size=dist.get_world_size(), subgroup=lambda members: dist.new_group(members))

    @classmethod
    def over_store(cls, store: Any, *, rank: int, size: int, timeout_s: float = 60.0) -> GlooRanks:
        """A group of its own over ``store``; each subgroup over a prefix of it (every rank
        creates every subgroup, in the same order; a rank outside one gets None)."""
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        made = [0]

        def subgroup(members: list[int]) -> Any:
            made[0] += 1
            if rank not in members:
                return None
            prefix = dist.PrefixStore(f"autopar-sync-{made[0]}", store)
            return dist.ProcessGroupGloo(prefix, members.index(rank), len(members), timeout)

        return cls(dist.ProcessGroupGloo(dist.PrefixStore("autopar-sync", store), rank, size, timeout),
                   rank=rank, size=size, subgroup=subgroup)

    def subgroup(self, members: list[int]) -> Any:
        return self._subgroup(members)

    def barrier(self) -> None:
        self.every(0.0)

    def every(self, value: float) -> list[float]:
        """``value`` of every rank, in rank order."""
        mine = torch.tensor([value], dtype=torch.float64)
        every = [torch.zeros(1, dtype=torch.float64) for _ in range(self.size)]
        self.group.allgather([every], [mine]).wait()
        return [float(x) for x in every]


def _sync_points(work: Callable[[], Any], reps: int, calls: int, sizes: Sequence[int], *, ranks: GlooRanks,
                 group: Any, busy: bool, labels: dict[str, int], kind: str = "all_reduce"
                 ) -> list[dict[str, Any]]:
    """:func:`measure_sync_waits`' points for ``reps`` calls of ``work`` between collectives."""
    def iteration() -> None:
        for _ in range(reps):
            work()

    def timed(count: int, fn: Callable[[], Any]) -> float:
        ranks.barrier()
        return _per_call_s(count, fn) if busy else 0.0

    processes = labels["num_processes"]
    free = statistics.fmean(ranks.every(timed(calls, iteration))[:processes])
    points = []
    for size in sizes:
        buffer = torch.ones(max(1, size // 4))
        inbox = torch.empty_like(buffer)

        def collective(buffer: torch.Tensor = buffer, inbox: torch.Tensor = inbox) -> None:
            if kind == "all_reduce":
                group.allreduce([buffer]).wait()
                return
            peer = 1 - group.rank()  # ring attention's hop on cp 2: send to and receive from the other
            works = [group.send([buffer], peer, 0), group.recv([inbox], peer, 0)]
            for handle in works:
                handle.wait()

        inside = [0.0]

        def both(collective: Callable[[], None] = collective, inside: list[float] = inside) -> None:
            iteration()
            start = time.perf_counter()
            collective()
            inside[0] += time.perf_counter() - start

        table = max(ranks.every(statistics.median(timed(1, collective) for _ in range(max(3, calls)))))
        inside[0] = 0.0
        synced = max(ranks.every(timed(calls, both)))
        waited = statistics.fmean(ranks.every(inside[0] / calls)[:processes])
        points.append({**labels, "kind": kind, "interval_s": free, "size_bytes": size,
                       "in_step_s": waited, "loop_s": synced - free, "collective_s": table})
    return points


def _sync_child(index: int, num: int, store_path: str, seconds: float, repeats: Sequence[int],
                results: Any, kind: str = "all_reduce") -> None:
    """One forked process of :func:`measure_sync_waits_in_processes`: a gloo group of its own (the
    process it was forked from may be a rank of another)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    ranks = GlooRanks.over_store(dist.FileStore(store_path, num), rank=index, size=num)
    points = measure_sync_waits(gpt_stack_work(*SYNC_LAYER_SHAPE, num_layers=1), group_sizes=(2, num),
                                seconds=seconds, repeats=repeats, ranks=ranks, kind=kind)
    if index == 0:
        results.put(points)


def measure_sync_waits_in_processes(counts: Sequence[int], *, seconds: float,
                                    repeats: Sequence[int] = SYNC_REPEATS, kind: str = "all_reduce"
                                    ) -> list[dict[str, Any]]:
    """:func:`measure_sync_waits` (of ``kind``) on ``n`` processes forked from this one for each ``n``
    in ``counts`` (≥ 2), each a rank of its own gloo group over a file store; ``seconds`` shared by
    the counts."""
    import multiprocessing
    import tempfile

    context = multiprocessing.get_context("fork")
    points: list[dict[str, Any]] = []
    numbers = sorted({n for n in counts if n >= 2})
    for n in numbers:
        with tempfile.TemporaryDirectory(prefix="autopar-sync-") as folder:
            results = context.SimpleQueue()
            children = [context.Process(target=_sync_child, daemon=True,
                                        args=(i, n, os.path.join(folder, "store"), seconds / len(numbers),
                                              tuple(repeats), results, kind)) for i in range(n)]
            for child in children:
                child.start()
            for child in children:
                child.join(timeout=60 + 4 * seconds)
            if any(child.exitcode != 0 for child in children):
                raise RuntimeError(f"the {n}-process sync measurement failed "
                                   f"(exit codes {[c.exitcode for c in children]})")
            points += results.get()
    return points

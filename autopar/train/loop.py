"""The training loop of one rank: data, model, plan, steps, held-out loss, metrics, checkpoints.

Data flow: :class:`~autopar.train.config.TrainConfig` → the corpus folder (``autopar.data.Corpus``,
split into train and held-out by file; ``corpus = "stdlib"`` is the Python standard library) → a
byte-level BPE tokenizer trained on it (cached) → the model (``autopar.train.model``, seeded) →
``autopar.compile(model, cluster, fix=..., max_grad_norm=..., passes=...)`` → ``compiled.prepare`` on a
global-shaped batch (the planner chooses what ``fix`` leaves open; the engine starts) → this rank's
place in the plan (dp and cp rank; pipeline ranks without the first or last stage read nothing) →
``autopar.data.TokenLoader`` reading only this rank's rows → AdamW with warm-up + cosine
(``torch.optim.lr_scheduler.LambdaLR`` on ``compiled.optimizer``) → resume from the latest checkpoint
in ``out`` if there is one (model, optimizer, LR schedule, loader position, step) → steps
(``compiled.step(rows, local=True)``; bf16 autocast on GPUs only) → every ``eval_interval`` steps
the held-out loss by the parallel model (``compiled.evaluate``), every step a metrics row
(``autopar.train.metrics``), every ``checkpoint_interval`` steps a checkpoint
(``autopar.train.checkpoints``) → with ``report``, ``compiled.report`` on the last global batch
(every rank builds it from the loader's window ids: measured steps take global batches; a
collective; restores the model) printed on rank 0 → :class:`TrainResult` (rank 0 also writes it to
``OUT/result.json``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from autopar.compile import Compiled, compile
from autopar.data import Corpus, TokenLoader, stdlib_corpus, train_tokenizer
from autopar.plans import Plan
from autopar.train import checkpoints
from autopar.train.config import TrainConfig
from autopar.train.metrics import MetricsLog, step_line
from autopar.train.model import build_model

RESULT = "result.json"


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a run did: its steps and losses, held-out loss before and after, throughput and the plan
    it ran (``plan`` as JSON text: ``Plan.from_json(result.plan_json)``)."""

    out: str
    first_step: int  # 0, or the step of the checkpoint the run resumed from
    last_step: int
    losses: tuple[float, ...]  # this run's training losses, one per step
    eval_loss_before: float | None  # before any training (a resumed run: the first run's)
    eval_loss_after: float | None
    tokens_per_s: float | None  # whole cluster, steps only
    mfu: float | None
    measured_step_s: float | None  # median over this run's steps
    predicted_step_s: float | None
    checkpoint: str | None
    samples_read: int  # training rows this rank's loader read in this run (its data-parallel share)
    plan_json: str = field(repr=False)

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def plan(self) -> Plan:
        return Plan.from_json(self.plan_json)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainResult:
        data = json.loads(text)
        data["losses"] = tuple(data["losses"])
        return cls(**data)


@dataclass
class _Progress:
    """The run's counters (saved in checkpoints)."""

    tokens: int = 0
    train_time_s: float = 0.0
    eval_loss_before: float | None = None
    losses: list[float] = field(default_factory=list)
    step_times_s: list[float] = field(default_factory=list)


def run(config: TrainConfig, *, world_size: int = 1) -> TrainResult:
    """Train on this process's rank (inside the process group when ``world_size`` > 1)."""
    out = Path(config.out)
    rank = dist.get_rank() if dist.is_initialized() else 0
    corpus = stdlib_corpus(heldout_fraction=config.heldout_fraction) if config.corpus == "stdlib" else \
        Corpus.from_folder(config.corpus, heldout_fraction=config.heldout_fraction)
    tokenizer = train_tokenizer(corpus, vocab_size=config.vocab_size, cache_dir=config.cache_dir)
    built = build_model(config.model, vocab_size=tokenizer.vocab_size, seed=config.seed)
    check_seq_len(config.seq_len, built.max_seq_len, config.model)
    if world_size == 1 and torch.cuda.is_available():
        built.model.cuda()
    compiled = compile(built.model, config.cluster or f"local:{world_size}", fix=config.compile_fix,
                       optimizer=_adamw(config), max_grad_norm=config.max_grad_norm,
                       time_limit_s=config.plan_time_limit_s,
                       passes=config.graph_passes or None)  # None: those `autopar run --moe ...` hands over
    example = torch.zeros(config.global_batch_size, config.seq_len, dtype=torch.long,
                          device=next(built.model.parameters()).device)
    device = compiled.prepare(example).device
    plan = compiled.plan
    loader = TokenLoader(corpus, tokenizer, **_placement(compiled, config), seed=config.seed,
                         max_seq_len=built.max_seq_len, fim_rate=config.fim_rate, cache_dir=config.cache_dir)
    scheduler = torch.optim.lr_scheduler.LambdaLR(compiled.optimizer, lr_factor(config))
    log = MetricsLog(out, enabled=rank == 0, total_steps=config.steps)
    progress = _resume(compiled, loader, scheduler, config, log)
    trainer = _Trainer(config, compiled, loader, scheduler, log, progress, device, plan)
    return trainer.run(first_step=compiled.num_steps)


class _Trainer:
    """The step loop over one prepared run (see the module docstring)."""

    def __init__(self, config: TrainConfig, compiled: Compiled, loader: TokenLoader,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, log: MetricsLog, progress: _Progress,
                 device: torch.device, plan: Plan) -> None:
        self.config, self.compiled, self.loader, self.scheduler = config, compiled, loader, scheduler
        self.log, self.progress, self.device, self.plan = log, progress, device, plan
        bf16 = device.type == "cuda" and config.bf16
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        self.started = time.perf_counter()
        self.checkpoint: Path | None = None

    def run(self, *, first_step: int) -> TrainResult:
        config, log = self.config, self.log
        log.start(first_step)
        eval_after = None
        try:
            if self.progress.eval_loss_before is None:
                self.progress.eval_loss_before = eval_after = self.held_out_loss()
                log.line(f"step {first_step} · held-out loss {eval_after:.4f} (before training)")
            stop = self.finished(first_step)
            if stop:
                log.line(f"already at step {first_step} (steps = {config.steps}): nothing to train; pass a "
                         "larger --steps to continue")
            while not stop:
                row = self.train_step()
                step = row["step"]
                stop = self.finished(step)
                if step % config.eval_interval == 0 or stop:
                    row["eval_loss"] = eval_after = self.held_out_loss()
                log.write(row)
                if step % config.log_interval == 0 or "eval_loss" in row:
                    log.line(step_line(row, config.steps))
                if step % config.checkpoint_interval == 0 or stop:
                    self.save(step)
        finally:
            log.close()
        if config.report:
            self.measured_report()
        return self.result(first_step, eval_after)

    def measured_report(self) -> None:
        """``compiled.report`` on the last training batch (a collective; the model is restored after
        it), its tables printed on rank 0. Every rank builds the GLOBAL batch from the loader's window
        ids: measured steps take global batches."""
        loader = self.loader
        tokens = loader.windows.rows(loader.global_rows(max(loader.step - 1, 0)))
        inputs, targets = self._on(tokens[:, :-1]), self._on(tokens[:, 1:])
        with self.autocast:
            measured = self.compiled.report(inputs, targets)
        if self.log.enabled:
            self.log.console.print(measured)

    def finished(self, step: int) -> bool:
        """Whether the run is over: ``steps`` reached or the time budget spent (agreed by all ranks)."""
        if self.config.steps is not None and step >= self.config.steps:
            return True
        if self.config.time_budget_s is None:
            return False
        spent = torch.tensor([float(time.perf_counter() - self.started >= self.config.time_budget_s)],
                             device=self.device)
        if dist.is_initialized():
            dist.all_reduce(spent, op=dist.ReduceOp.MAX)
        return bool(spent.item())

    def train_step(self) -> dict[str, Any]:
        batch = next(self.loader)
        lr = self.scheduler.get_last_lr()[0]
        start = time.perf_counter()
        with self.autocast:
            loss = self.compiled.step(self._on(batch.inputs), self._on(batch.targets), local=True)
        step_s = time.perf_counter() - start
        self.scheduler.step()
        tokens = self.config.global_batch_size * self.config.seq_len
        progress = self.progress
        progress.tokens += tokens
        progress.train_time_s += step_s
        progress.losses.append(loss)
        progress.step_times_s.append(step_s)
        predicted = self.plan.predicted
        return {"step": self.compiled.num_steps, "loss": loss, "lr": lr,
                "grad_norm": self.compiled.last_grad_norm, "tokens": progress.tokens,
                "tokens_per_s": tokens / step_s, "mfu": measured_mfu(self.plan, step_s),
                "memory_bytes": memory_bytes(self.device), "step_s": step_s,
                "predicted_step_s": predicted.step_time_s, "elapsed_s": time.perf_counter() - self.started}

    def held_out_loss(self) -> float:
        """Mean loss over the first ``eval_batches`` held-out global batches, by the parallel model."""
        losses = []
        for batch in self.loader.eval_batches(max_batches=self.config.eval_batches):
            with self.autocast:
                inputs, targets = self._on(batch.inputs), self._on(batch.targets)
                losses.append(self.compiled.evaluate(inputs, targets, local=True))
        return sum(losses) / max(len(losses), 1)

    def save(self, step: int) -> None:
        state = {"model": self.config.model, "step": step, "loader": self.loader.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "tokens": self.progress.tokens,
                 "train_time_s": self.progress.train_time_s,
                 "eval_loss_before": self.progress.eval_loss_before}
        self.checkpoint = checkpoints.save(self.compiled, Path(self.config.out), step, state,
                                           keep=self.config.keep_checkpoints)

    def _on(self, value: torch.Tensor | None) -> torch.Tensor | None:
        return None if value is None else value.to(self.device)

    def result(self, first_step: int, eval_after: float | None) -> TrainResult:
        progress, predicted = self.progress, self.plan.predicted
        times = sorted(progress.step_times_s)
        median = times[len(times) // 2] if times else None
        tokens = len(times) * self.config.global_batch_size * self.config.seq_len
        result = TrainResult(
            out=self.config.out, first_step=first_step, last_step=self.compiled.num_steps,
            losses=tuple(progress.losses), eval_loss_before=progress.eval_loss_before,
            eval_loss_after=eval_after, tokens_per_s=tokens / sum(times) if times else None,
            mfu=measured_mfu(self.plan, median), measured_step_s=median,
            predicted_step_s=predicted.step_time_s, checkpoint=None if self.checkpoint is None else
            str(self.checkpoint), samples_read=self.loader.samples_read, plan_json=self.plan.to_json())
        if self.log.enabled:
            path = Path(self.config.out) / RESULT
            path.with_name(RESULT + ".tmp").write_text(result.to_json(), encoding="utf-8")
            os.replace(path.with_name(RESULT + ".tmp"), path)
        return result


def check_seq_len(seq_len: int, max_seq_len: int | None, model: str) -> None:
    if max_seq_len is not None and seq_len > max_seq_len:
        raise ValueError(f"seq_len = {seq_len} is longer than model {model!r} takes ({max_seq_len} "
                         f"positions): pass --seq-len {max_seq_len} or less, or a model with more positions")


def measured_mfu(plan: Plan, step_s: float | None) -> float | None:
    """The plan's predicted MFU rescaled to a measured step time (the same FLOPs in ``step_s``)."""
    predicted = plan.predicted
    if not step_s or not predicted.mfu or not predicted.step_time_s:
        return None
    return predicted.mfu * predicted.step_time_s / step_s


def lr_factor(config: TrainConfig) -> Callable[[int], float]:
    """Step → learning-rate multiplier: linear warm-up, then cosine down to ``min_lr_ratio`` at ``steps``
    (constant after warm-up without ``steps``)."""
    warmup, steps, floor = config.warmup_steps, config.steps, config.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if steps is None:
            return 1.0
        done = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


def memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: the CUDA allocator's peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _adamw(config: TrainConfig) -> Callable[[Iterator[torch.nn.Parameter]], torch.optim.Optimizer]:
    def factory(params: Iterator[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    return factory


def _placement(compiled: Compiled, config: TrainConfig) -> dict[str, Any]:
    """The loader's geometry for this rank: its dp and cp coordinates; whether it reads data."""
    geometry: dict[str, Any] = {"global_batch_size": config.global_batch_size, "seq_len": config.seq_len}
    if not compiled.distributed:
        return geometry
    engine, par = compiled.engine, compiled.plan.parallelism
    if config.global_batch_size % par.dp:
        raise ValueError(f"global_batch_size = {config.global_batch_size} does not divide over the plan's "
                         f"dp({par.dp}) × cp({par.cp}) ranks (dp splits the batch, cp the sequence): use a "
                         f"multiple of {par.dp}")
    return geometry | {"dp_degree": par.dp, "dp_rank": engine.layout.dp_rank, "cp_degree": par.cp,
                       "cp_rank": engine.layout.cp_rank, "reads_data": engine.has_first or engine.has_last}


def _resume(compiled: Compiled, loader: TokenLoader, scheduler: torch.optim.lr_scheduler.LRScheduler,
            config: TrainConfig, log: MetricsLog) -> _Progress:
    """Restore the latest checkpoint in ``out`` if there is one; the run's counters."""
    found = checkpoints.latest(Path(config.out))
    if found is None:
        log.keep_until(0)
        return _Progress()
    step, path = found
    state = checkpoints.load(compiled, path, model=config.model)
    try:
        loader.load_state_dict(state["loader"])
    except ValueError as err:
        raise ValueError(f"cannot resume from {path}: {err}; train into a new --out folder") from None
    scheduler.load_state_dict(state["scheduler"])
    log.keep_until(step)
    log.line(f"resumed from {path} (step {step})")
    return _Progress(tokens=state["tokens"], train_time_s=state["train_time_s"],
                     eval_loss_before=state["eval_loss_before"])


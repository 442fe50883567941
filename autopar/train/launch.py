"""``autopar.train(...)``: one call that trains, whoever started the processes.

Data flow: ``autopar.train(model=..., corpus=..., out=..., steps=..., nproc=N)`` (or a
:class:`~autopar.train.config.TrainConfig`) → :func:`preflight` (the corpus folder, the sequence
length against a zoo model's, the batch against pinned dp: one clear ValueError before any process
starts) → where the processes come from:

- under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set; one node or
  many) every process joins the launcher's group (``autopar.runtime.launch.init_from_env``) and
  trains its rank; the cluster defaults to ``local:<WORLD_SIZE>``;
- inside a process group that is already initialized (``autopar run script.py``), likewise;
- otherwise with ``N`` > 1 local devices, :func:`autopar.runtime.launch.spawn` starts ``N`` gloo
  processes that each run :func:`spawned_rank`; this call returns rank 0's result, read back from
  ``OUT/result.json``;
- with one device, it trains here.

→ ``autopar.train.loop.run`` on every rank → :class:`~autopar.train.loop.TrainResult`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch.distributed as dist

from autopar.cluster import ClusterSpec
from autopar.data import Corpus
from autopar.runtime.launch import init_from_env, launched_by_torchrun, spawn
from autopar.train.config import TrainConfig
from autopar.train.loop import RESULT, TrainResult, check_seq_len, run
from autopar.train.model import zoo_max_seq_len

COLLECTIVE_TIMEOUT_S = 120.0  # rank 0 trains the tokenizer and plans while the others wait


def train(config: TrainConfig | None = None, /, **fields: Any) -> TrainResult:
    """Train a model on a folder of text (see the module docstring); ``fields`` are
    :class:`TrainConfig`'s (``model``, ``corpus``, ``out``, ``steps``, ``nproc``, ...), and override
    ``config``'s when both are given. Returns the run's :class:`TrainResult` (on every rank under
    torchrun; rank 0's when this call spawned the processes)."""
    if config is None:
        config = TrainConfig.from_mapping(fields, source="autopar.train(...)")
    elif fields:
        config = TrainConfig.from_mapping({**_fields(config), **fields}, source="autopar.train(...)")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"autopar.train takes a TrainConfig or keyword fields, got {type(config).__name__}")
    if launched_by_torchrun() or dist.is_initialized():
        return train_this_rank(config)
    preflight(config)
    world = world_size(config)
    if world == 1:
        return run(config)
    spawn(spawned_rank, world, config.to_json(), timeout_s=COLLECTIVE_TIMEOUT_S)
    return read_result(config)


def train_this_rank(config: TrainConfig) -> TrainResult:
    """This process's rank of a launched run (torchrun's environment, or a group already joined)."""
    if not dist.is_initialized():
        init_from_env(timeout_s=COLLECTIVE_TIMEOUT_S)
    if dist.get_rank() == 0:
        preflight(config)
    world = dist.get_world_size()
    return run(config, world_size=world)


def spawned_rank(rank: int, world: int, config_json: str) -> None:
    """One spawned rank (``autopar.runtime.launch.spawn`` calls it inside the gloo group)."""
    run(TrainConfig.from_json(config_json), world_size=world)


def world_size(config: TrainConfig) -> int:
    """Processes the run needs on this machine: the cluster's devices (``local:<nproc>`` by default)."""
    cluster = ClusterSpec.parse(config.cluster) if config.cluster else None
    if cluster is None:
        return config.nproc
    if not cluster.local and cluster.num_devices > 1:
        raise ValueError(f"cluster {config.cluster!r} is not local: start its {cluster.num_devices} "
                         "processes with torchrun (see the README's multi-node command), or use "
                         "cluster = 'local:N'")
    return cluster.num_devices


def preflight(config: TrainConfig) -> None:
    """The user mistakes that can be found before any process starts, as one ValueError each."""
    if config.corpus != "stdlib":
        Corpus.from_folder(config.corpus, heldout_fraction=config.heldout_fraction)
    if zoo_max_seq_len(config.model) is not None:
        check_seq_len(config.seq_len, zoo_max_seq_len(config.model), config.model)
    dp, cp = config.fix.get("dp"), config.fix.get("cp") or 1
    if isinstance(dp, int) and config.global_batch_size % dp:
        raise ValueError(f"global_batch_size = {config.global_batch_size} does not divide over dp({dp}) × "
                         f"cp({cp}) ranks (dp splits the batch, cp the sequence): use a multiple of {dp}")
    if isinstance(cp, int) and config.seq_len % cp:
        raise ValueError(f"seq_len = {config.seq_len} does not divide over cp({cp}): use a multiple of {cp}")


def read_result(config: TrainConfig) -> TrainResult:
    path = Path(config.out) / RESULT
    return TrainResult.from_json(path.read_text(encoding="utf-8"))


def _fields(config: TrainConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


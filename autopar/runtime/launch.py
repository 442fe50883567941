"""Process launch: autopar's own local spawner and the torchrun environment.

Data flow: ``autopar run script.py --nproc N``, ``autopar demo`` and the distributed
tests call :func:`spawn`, which starts N processes on this machine (forks of a fork server that
imported torch and autopar once, :data:`FORK_SERVER_PRELOAD`), joins them in a
gloo process group through a ``file://`` rendezvous with a short timeout, and runs
one function per rank. Under ``torchrun`` the group is already described by the
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``…); :func:`init_from_env`
joins it (NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 60.0
FORK_SERVER_PRELOAD = ("torch", "torch.distributed", "autopar")
"""Imported once by the fork server that starts the ranks (Python's ``forkserver`` start method):
every rank is a fork of a process that already imported torch and autopar, not a fresh
interpreter importing them again (MEASURED on a 2-core VM: 4 ranks of an empty function 5.4 s
under ``spawn``). The server runs no torch operation, so no thread pool is forked."""


def _worker(rank: int, fn: Callable[..., Any], world_size: int, init_file: str, timeout_s: float,
            args: tuple[Any, ...], environment: dict[str, str]) -> None:
    torch.set_num_threads(1)
    os.environ.clear()  # the caller's environment at spawn time, not the fork server's at its start
    os.environ.update(environment)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "AUTOPAR_SPAWNED": "1"})
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        # every rank has finished connecting before any runs ``fn``: a rank that fails at once
        # would otherwise cut a peer's connection set-up short, which gloo logs as its own error
        dist.barrier()
        fn(rank, world_size, *args)
        dist.barrier()  # every rank's last sends and receives are done before any group goes away
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], nproc: int, *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nproc`` local processes over gloo.

    ``fn`` must be importable (a module-level function). A failure in any rank is
    raised here with that rank's traceback; a collective that waits longer than
    ``timeout_s`` fails instead of hanging.
    """
    if type(nproc) is not int or nproc < 1:
        raise ValueError(f"nproc = {nproc!r} is invalid: expected an int >= 1")
    method = _fork_server_for_this_output()
    with tempfile.TemporaryDirectory(prefix="autopar-rdzv-") as folder:
        init_file = os.path.join(folder, "rendezvous")
        mp.start_processes(_worker, args=(fn, nproc, init_file, timeout_s, args, dict(os.environ)),
                           nprocs=nproc, join=True, start_method=method)


_server_output: list[tuple[tuple[int, int], ...]] = []


def _fork_server_for_this_output() -> str:
    """``"forkserver"`` with :data:`FORK_SERVER_PRELOAD`, its server (re)started when this
    process's stdout/stderr are not those the running server inherited (a rank prints where the
    caller's output goes now, e.g. after a redirect); ``"spawn"`` where that cannot be arranged."""
    import multiprocessing.forkserver as forkserver

    server = getattr(forkserver, "_forkserver", None)
    try:
        output = tuple((os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2))
    except OSError:
        return "spawn"
    if server is None or not hasattr(server, "_stop"):
        return "spawn"
    if _server_output and _server_output[-1] != output:
        server._stop()  # the next start launches a server with the current descriptors
    _server_output[:] = [output]
    mp.set_forkserver_preload(list(FORK_SERVER_PRELOAD))
    return "forkserver"


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether a launcher (``torchrun``, or any that sets its variables) described a process group
    of more than one process in the environment."""
    return all(k in os.environ for k in LAUNCHER_ENV) and os.environ["WORLD_SIZE"] not in ("", "1")


def init_from_env(*, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group that ``torchrun`` described in the environment."""
    if dist.is_initialized():
        return
    missing = [k for k in LAUNCHER_ENV if k not in os.environ]
    if missing:
        raise ValueError(
            f"no process group: environment variables {missing} are not set; launch with "
            "`torchrun --nproc-per-node N script.py` or `autopar run script.py --nproc N`"
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))

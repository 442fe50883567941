"""Sharded checkpoints of a compiled model that any other Plan can load.

Data flow: ``Compiled`` → its executor (``autopar.runtime.executor.Executor``: on several
devices this rank's stage modules, parameters possibly DTensors sharded by FSDP2 or tensor
parallelism; on one device the whole model) → :func:`state_dict` names every tensor by the
ORIGINAL model's parameter FQN (``Executor.parameter_copies``) → ``torch.distributed.
checkpoint`` (DCP) writes each rank's shards into one directory → :func:`load`
under any Plan and world size: DCP reads, for each rank, the slices its own
(DTensor or plain) tensors hold. Single-device runs use the same format with no
process group, so a checkpoint moves freely between one and many devices.

State dict (nested; DCP flattens keys with dots)::

    model.<fqn>                   parameter
    optimizer.state.<fqn>.<name>  optimizer state (``exp_avg``, ``step``, …)
    optimizer.hyper.<fqn>         numeric hyperparameters of the parameter's group
    num_steps                     ``compiled.num_steps``
    passes.<pass>.<key>           graph passes' run-time state (``compiled.pass_state``: ints,
                                  e.g. ``passes.random_ltd.consumed_layer_tokens``)
    extra.<name>                  the caller's tensors

Every entry is a tensor: DCP reads non-tensor entries back with ``pickle``. (DCP's
own ``.metadata`` file is a pickle too: load only checkpoints you trust.)
Saving is atomic: ranks write ``<path>.partial``; rank 0 then swaps it in (the old
checkpoint stays as ``<path>.previous`` until the swap is done, and :func:`load`
falls back to it), so a crash mid-save never loses the last good checkpoint. All
ranks must see one shared file system.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from autopar.runtime.pass_state import state_int

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

    from autopar.compile import Compiled
    from autopar.runtime.executor import Executor


def _dcp() -> Any:
    """``torch.distributed.checkpoint``, imported on first use (~0.5 s, which ``import autopar``
    should not pay)."""
    import torch.distributed.checkpoint as dcp

    return dcp


def _tensor_metadata() -> type:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return TensorStorageMetadata


PARTIAL, PREVIOUS = ".partial", ".previous"

log = logging.getLogger("autopar.checkpoint")


def state_dict(compiled: Compiled, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """This rank's checkpoint content, keyed by the original model's parameter names.

    Its tensors alias the live ones (DTensors stay DTensors): DCP reads them on save and
    writes into them on load."""
    params = _parameters(compiled)
    optimizer = _optimizer(compiled)
    names = {id(p): fqn for fqn, copies in params.items() for p in copies}
    state: dict[str, dict[str, torch.Tensor]] = {}
    hyper: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            fqn = names[id(param)]
            if fqn in hyper:  # a tied copy of a parameter already seen
                continue
            hyper[fqn] = _hyper(group)
            tensors = {k: v.detach() for k, v in optimizer.state.get(param, {}).items()
                       if isinstance(v, torch.Tensor)}
            if tensors:
                state[fqn] = tensors
    return {
        "model": {fqn: copies[0].detach() for fqn, copies in params.items()},
        "optimizer": {"state": state, "hyper": hyper},
        "num_steps": torch.tensor(compiled.num_steps, dtype=torch.int64),
        "passes": {name: {key: torch.tensor(value, dtype=torch.int64) for key, value in state.items()}
                   for name, state in compiled.pass_state.items()},
        "extra": _check_extra(extra or {}),
    }


def save(compiled: Compiled, path: str | os.PathLike[str], *, extra: dict[str, Any] | None = None) -> None:
    """Write a checkpoint directory (collective: every rank calls it with the same path)."""
    path = os.fspath(path).rstrip("/")
    partial = path + PARTIAL
    content = state_dict(compiled, extra=extra)
    problems = _unwritable(path)
    _agree(problems, path, _device(compiled), verb="save")
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a crashed save
    _barrier()
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet():  # returns once every rank wrote and rank 0 wrote the metadata
            _dcp().save(content, checkpoint_id=partial)
    except CheckpointException as err:  # a BaseException: `except Exception` would let it through
        raise ValueError(f"cannot save checkpoint {path}: writing failed ({_reason(err)}); choose a folder "
                         "every rank can write, with room for the checkpoint") from None
    if _rank() == 0:
        _swap_in(partial, path)
    _barrier()


def load(compiled: Compiled, path: str | os.PathLike[str], *,
         example_inputs: Any = None) -> dict[str, torch.Tensor]:
    """Restore a checkpoint saved under any Plan; returns its ``extra`` tensors.

    A multi-device ``compiled`` builds its engine at the first ``step``; call ``load``
    after that, or pass ``example_inputs`` (the inputs of a ``step``) to build it now
    (``compiled.prepare``).
    """
    path = os.fspath(path).rstrip("/")
    _ensure_ready(compiled, example_inputs)
    optimizer = _optimizer(compiled)
    created = _init_optimizer_state(optimizer)
    try:
        where, metadata, target = _checked_target(compiled, path)
        unsaved = _drop_unsaved_state(target, metadata, _parameters(compiled))
        _read_pass_state(target["passes"], where, path)
        _read_tensors(target, where, path)
    except ValueError:
        for param in created:  # a failed load leaves the optimizer as it was
            optimizer.state.pop(param, None)
        raise
    for param in unsaved:
        optimizer.state.pop(param, None)
    _restore(target, compiled, optimizer)
    return target["extra"]


def exists(path: str | os.PathLike[str]) -> bool:
    """Whether :func:`load` would find a checkpoint at ``path`` (for resume-if-present logic)."""
    path = os.fspath(path).rstrip("/")
    return any(os.path.isdir(p) for p in (path, path + PREVIOUS))


def _checked_target(compiled: Compiled, path: str) -> tuple[str, Metadata, dict[str, Any]]:
    """The directory to read, its metadata, and the state dict to load into; raises on every
    rank if any rank finds the checkpoint missing, unreadable or not of this model."""
    where, metadata, problems = _read(path)
    target = state_dict(compiled)
    if metadata is not None:
        target["extra"] = {key[len("extra."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
                           for key, meta in metadata.state_dict_metadata.items()
                           if key.startswith("extra.") and isinstance(meta, _tensor_metadata())}
        target["passes"] = _saved_pass_state(metadata)
        problems = _mismatches(target, metadata, _all_fqns(compiled))
        problems += [f"passes.{name}.{key} was saved with shape {tuple(value.shape)} and dtype "
                     f"{value.dtype}, not as one int" for name, state in target["passes"].items()
                     for key, value in state.items() if value.numel() != 1 or value.is_floating_point()
                     or value.is_complex() or value.dtype == torch.bool]
    _agree(problems, path, _device(compiled))
    assert where is not None and metadata is not None
    return where, metadata, target


def _read_tensors(target: dict[str, Any], where: str, path: str) -> None:
    """DCP's read of the checkpoint's tensors into ``target``; a damaged data file is one ValueError."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet():
            _dcp().load(target, checkpoint_id=where)
    except CheckpointException as err:  # a BaseException: `except Exception` would let it through
        raise ValueError(f"cannot load checkpoint {path}: reading {where} failed ({_reason(err)}); its files "
                         "are damaged: load an earlier checkpoint, or save again") from None


def _read_pass_state(passes: dict[str, dict[str, torch.Tensor]], where: str, path: str) -> None:
    """Read and check the passes' state before the weights, so that a bad value fails the load
    before it changed anything."""
    if not passes:
        return
    _read_tensors({"passes": passes}, where, path)
    try:
        for name, state in passes.items():
            for key, value in state.items():
                state_int(f"passes.{name}.{key}", value)
    except ValueError as err:
        raise ValueError(f"cannot load checkpoint {path}: {err}") from None


def _reason(err: BaseException) -> str:
    """The first failure a ``CheckpointException`` carries (per rank: an exception, or an
    ``(exception, traceback)`` pair), as one short line."""
    failures = list(getattr(err, "failures", {}).values())
    if not failures:
        return " ".join(str(err).split())[:200]
    first = failures[0][0] if isinstance(failures[0], tuple) and failures[0] else failures[0]
    text = (f"{type(first).__name__}: {first}".removesuffix(": ") if isinstance(first, BaseException)
            else str(first))
    return " ".join(text.split())[:200]


def _saved_pass_state(metadata: Metadata) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors to load the saved ``passes.<pass>.<key>`` entries into (whatever passes this run has)."""
    passes: dict[str, dict[str, torch.Tensor]] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("passes.") and isinstance(meta, _tensor_metadata()):
            name, _, field = key[len("passes."):].partition(".")
            passes.setdefault(name, {})[field] = torch.empty(meta.size, dtype=meta.properties.dtype)
    return passes


def _executor(compiled: Compiled) -> Executor:
    try:
        return compiled.executor
    except RuntimeError:
        raise ValueError("nothing to checkpoint yet: a multi-device model has no engine before its first "
                         "compiled.step(...); save after a step, or call compiled.prepare(inputs)") from None


def _optimizer(compiled: Compiled) -> torch.optim.Optimizer:
    return _executor(compiled).optimizer


def _parameters(compiled: Compiled) -> dict[str, list[torch.Tensor]]:
    """FQN → this rank's copies of that parameter (several when a tied weight's stages share a rank)."""
    return _executor(compiled).parameter_copies()


def _all_fqns(compiled: Compiled) -> set[str]:
    """Every parameter of the whole model (all ranks' together)."""
    return _executor(compiled).all_parameter_names()


def _ensure_ready(compiled: Compiled, example_inputs: Any) -> None:
    """Make the executor and every parameter exist (``compiled.prepare``) before loading into them."""
    if compiled.ready:
        return
    if example_inputs is None:
        raise ValueError("cannot load yet: the model's runtime (several devices) or the parameters its "
                         "passes create (MoE experts) do not exist yet; call autopar.load(compiled, path) "
                         "after the first compiled.step(inputs, targets) (or a forward, on one device), or "
                         "pass example_inputs=inputs (what step would get)")
    compiled.prepare(example_inputs)


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Create lazily made state (Adam's moments) so DCP has tensors to load into: one step
    with zero gradients and zero learning rate, which leaves the parameters as they are.
    Returns the parameters whose state it created."""
    missing = [p for g in optimizer.param_groups for p in g["params"]
               if p.requires_grad and p not in optimizer.state]
    if not missing:
        return []
    grads = {p: p.grad for g in optimizer.param_groups for p in g["params"]}
    for param in grads:
        param.grad = None
    for param in missing:
        param.grad = torch.zeros_like(param)
    lrs = [g["lr"] for g in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    for param, grad in grads.items():
        param.grad = grad
    return [p for p in missing if p in optimizer.state]


def _hyper(group: dict[str, Any]) -> torch.Tensor:
    """The group's numeric hyperparameters (lr, betas, eps, weight decay) in key order."""
    values: list[float] = []
    for key in sorted(group):
        value = group[key]
        if isinstance(value, int | float) and not isinstance(value, bool):
            values.append(float(value))
        elif isinstance(value, tuple) and all(isinstance(v, int | float) and not isinstance(v, bool)
                                              for v in value):
            values.extend(float(v) for v in value)
    return torch.tensor(values, dtype=torch.float64)


def _set_hyper(group: dict[str, Any], saved: torch.Tensor) -> None:
    values = iter(saved.tolist())
    for key in sorted(group):
        value = group[key]
        if isinstance(value, int | float) and not isinstance(value, bool):
            group[key] = type(value)(next(values))
        elif isinstance(value, tuple) and all(isinstance(v, int | float) and not isinstance(v, bool)
                                              for v in value):
            group[key] = tuple(type(v)(next(values)) for v in value)


def _check_extra(extra: dict[str, Any]) -> dict[str, torch.Tensor]:
    checked = {}
    for name, value in extra.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"extra key {name!r} is invalid: expected a non-empty str without dots")
        if isinstance(value, int | float):
            value = torch.tensor(value)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"extra[{name!r}] is a {type(value).__name__}: checkpoints hold tensors and "
                             "numbers only (never pickled objects); convert it to a tensor")
        checked[name] = value.detach()
    return checked


def _read(path: str) -> tuple[str | None, Metadata | None, list[str]]:
    """The directory to read (the previous one if a swap was cut short), its DCP metadata."""
    where = next((p for p in (path, path + PREVIOUS) if os.path.isdir(p)), None)
    if where is None:
        return None, None, [f"no checkpoint directory at {path}; pass the path given to autopar.save"]
    try:
        return where, _dcp().FileSystemReader(where).read_metadata(), []
    except Exception as err:  # noqa: BLE001 - any unreadable metadata means the same to the user
        return None, None, [f"{where} is not a complete checkpoint ({type(err).__name__}: {err}); "
                            "load an earlier checkpoint, or save again"]


def _mismatches(target: dict[str, Any], metadata: Metadata, all_fqns: set[str]) -> list[str]:
    saved = metadata.state_dict_metadata
    problems = []
    for key, tensor in _flatten(target):
        meta = saved.get(key)
        if meta is None and not key.startswith("optimizer.state."):
            problems.append(f"{key} is missing")
        elif isinstance(meta, _tensor_metadata()) and tuple(meta.size) != tuple(tensor.shape):
            problems.append(f"{key} was saved with shape {tuple(meta.size)}, "
                            f"this run has {tuple(tensor.shape)}")
    for fqn, names in target["optimizer"]["state"].items():  # none saved (no step yet) is fine
        found = [f"optimizer.state.{fqn}.{name}" in saved for name in names]
        if any(found) and not all(found):
            problems.append(f"optimizer state of {fqn} has {sorted(names)} here but not all of them in "
                            "the checkpoint; was it saved with another optimizer?")
    extra = sorted(k for k in saved if k.startswith("model.") and k[len("model."):] not in all_fqns)
    problems += [f"{key} is not a parameter of this model" for key in extra]
    return problems


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    items = []
    for key, value in tree.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _unwritable(path: str) -> list[str]:
    """Why this rank cannot write ``path`` (its parent folder is created if missing), or nothing."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        return [f"cannot create its folder {parent} ({err.strerror})"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"folder {parent} is not writable"]
    return []


def _agree(problems: list[str], path: str, device: torch.device, *, verb: str = "load") -> None:
    """Raise on every rank if any rank found a problem (so none waits in a collective)."""
    failed = torch.tensor([len(problems)], device=device)
    if dist.is_initialized():
        dist.all_reduce(failed)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "")
        fix = ("choose a folder every rank can write" if verb == "save" else "A checkpoint loads under any "
               "Plan and world size, but only into the model it was saved from")
        raise ValueError(f"cannot {verb} checkpoint {path}: {shown}; {fix}")
    if int(failed.item()):
        raise ValueError(f"cannot {verb} checkpoint {path}: another rank found a problem (see that rank's "
                         "error)")


def _drop_unsaved_state(target: dict[str, Any], metadata: Metadata,
                        params: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
    """Parameters that had no optimizer state when saved (no step yet) get none now: their state
    leaves ``target``; returns those parameters, whose state to drop once the load succeeded."""
    state, unsaved = target["optimizer"]["state"], []
    for fqn in list(state):
        if not any(f"optimizer.state.{fqn}.{name}" in metadata.state_dict_metadata for name in state[fqn]):
            del state[fqn]
            unsaved += params[fqn]
    return unsaved


def _restore(target: dict[str, Any], compiled: Compiled, optimizer: torch.optim.Optimizer) -> None:
    """What DCP cannot load in place: step counter, pass state, hyperparameters, tied copies on one rank."""
    compiled.num_steps = int(target["num_steps"])
    saved = {name: {key: int(value) for key, value in state.items()}
             for name, state in target["passes"].items()}
    missing = sorted({p.name for p in compiled.passes} - set(saved))
    if missing and compiled.pass_state:
        log.warning("the checkpoint holds no state of pass(es) %s (saved without them): their schedules "
                    "follow the restored step %d, their counters restart at 0", missing, compiled.num_steps)
    compiled.load_pass_state(saved)
    params = _parameters(compiled)
    names = {id(p): fqn for fqn, copies in params.items() for p in copies}
    for group in optimizer.param_groups:
        if group["params"]:
            _set_hyper(group, target["optimizer"]["hyper"][names[id(group["params"][0])]])
    with torch.no_grad():
        for first, *others in params.values():
            for other in others:
                other.copy_(first)
                for name, value in optimizer.state.get(first, {}).items():
                    if isinstance(value, torch.Tensor):
                        optimizer.state[other][name].copy_(value)


def _swap_in(partial: str, path: str) -> None:
    """Replace ``path`` by ``partial``; at every instant ``path`` or ``path.previous`` is complete."""
    previous = path + PREVIOUS
    if os.path.isdir(path):
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(path, previous)
    os.rename(partial, path)
    shutil.rmtree(previous, ignore_errors=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that it runs in one process whenever there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _device(compiled: Compiled) -> torch.device:
    return _executor(compiled).device

"""Fuzz the checkpoints and state dicts a user hands a compiled model (one device): ``autopar.load``
of damaged, foreign and crafted checkpoint folders, ``autopar.save`` interrupted at any point, and
``compiled.load_state_dict`` with odd ``passes.*`` entries.

Properties: a load succeeds or raises one ValueError/TypeError line, and a failed load leaves the
model, its optimizer state, step counter and pass state exactly as they were; after a save that
failed anywhere, the path still loads, as the previous checkpoint or the new one.
"""

from __future__ import annotations

import itertools
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import autopar
from autopar.checkpoint import state_dict as checkpoint_content
from autopar.passes import RandomLTD
from tests.fuzz.strategies import accepted, fuzz_settings, hard_limit, json_values

RANDOM_LTD = RandomLTD(min_tokens=4, num_steps=4, layers=(1,))
_cases = itertools.count()


def compiled_model(*, hidden_size: int = 16, num_layers: int = 3, **options: Any) -> Any:
    """A tiny GPT compiled on one device with random-LTD, after one step (optimizer state exists)."""
    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=num_layers, hidden_size=hidden_size, num_heads=2,
                                 vocab_size=32, seq_len=8)
    inputs, targets = autopar.models.example_batch(model, batch_size=2, seq_len=8)
    compiled = autopar.compile(model, "local:1", **{"passes": [RANDOM_LTD], **options})
    compiled.step(inputs, targets)
    return compiled


def crafted(content: dict[str, Any], change: str) -> dict[str, Any]:
    """A checkpoint another program could have written: autopar's content with one part changed."""
    passes = content["passes"]["random_ltd"]
    if change == "pass state not a scalar":
        passes["step"] = torch.tensor([1, 2])
    elif change == "pass state a float":
        passes["step"] = torch.tensor(1.5)
    elif change == "pass state negative":
        passes["microbatch"] = torch.tensor(-5)
    elif change == "unknown pass":
        content["passes"]["not_a_pass"] = {"step": torch.tensor(3)}
    elif change == "no step counter":
        del content["num_steps"]
    elif change == "step counter not a scalar":
        content["num_steps"] = torch.zeros(3, dtype=torch.int64)
    elif change == "odd extra":
        content["extra"] = {"flag": torch.ones(2, dtype=torch.bool),
                            "z": torch.zeros(1, dtype=torch.complex64)}
    elif change == "weights in fp64":
        content["model"] = {name: value.double() for name, value in content["model"].items()}
    elif change == "other optimizer":
        content["optimizer"]["state"] = {name: {"momentum_buffer": state["exp_avg"]}
                                         for name, state in content["optimizer"]["state"].items()}
    return content


CRAFTED = ("pass state not a scalar", "pass state a float", "pass state negative", "unknown pass",
           "no step counter", "step counter not a scalar", "odd extra", "weights in fp64", "other optimizer")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """The model under test, a second one to read checkpoints with, and a corpus of checkpoints:
    its own, one of another model (wider, shallower, SGD) and crafted ones."""
    folder = tmp_path_factory.mktemp("checkpoints")
    compiled = compiled_model()
    corpus = {"good": folder / "good"}
    autopar.save(compiled, corpus["good"], extra={"epoch": 3})
    foreign = compiled_model(hidden_size=32, num_layers=2, passes=[],
                             optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
    corpus["another model"] = folder / "another model"
    autopar.save(foreign, corpus["another model"])
    import torch.distributed.checkpoint as dcp

    for change in CRAFTED:
        content = crafted(_cloned(checkpoint_content(compiled, extra={"epoch": 3})), change)
        corpus[change] = folder / change
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(content, checkpoint_id=corpus[change])
    return World(folder=folder, compiled=compiled, reader=compiled_model(), corpus=corpus,
                 before=snapshot(compiled))


class World(SimpleNamespace):
    def __repr__(self) -> str:
        return f"World({sorted(self.corpus)})"


def _cloned(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _cloned(value) for key, value in tree.items()}
    return tree.clone() if isinstance(tree, torch.Tensor) else tree


def snapshot(compiled: Any) -> dict[str, Any]:
    """Everything a load may change: weights, optimizer state and hyperparameters, steps, pass state."""
    optimizer = compiled.optimizer
    return {
        "weights": {name: value.detach().clone() for name, value in compiled.state_dict().items()},
        "optimizer": [{key: value.clone() if isinstance(value, torch.Tensor) else value
                       for key, value in optimizer.state.get(param, {}).items()}
                      for group in optimizer.param_groups for param in group["params"]],
        "hyper": [{key: value for key, value in group.items() if key != "params"}
                  for group in optimizer.param_groups],
        "num_steps": compiled.num_steps,
        "pass_state": compiled.pass_state,
    }


def restored(world: SimpleNamespace) -> Any:
    """The model under test as the fixture left it (an example that failed may have changed it)."""
    if not same(snapshot(world.compiled), world.before):
        autopar.load(world.compiled, world.corpus["good"])
    return world.compiled


def same(first: Any, second: Any) -> bool:
    if isinstance(first, dict):
        return isinstance(second, dict) and first.keys() == second.keys() and all(
            same(first[key], second[key]) for key in first)
    if isinstance(first, list):
        return isinstance(second, list) and len(first) == len(second) and all(map(same, first, second))
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and torch.equal(first, second)
    return first == second


damages = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
    st.tuples(st.sampled_from(("delete", "empty", "junk", "swap with another model's"))),
)


def damage(folder: Path, file: str, how: tuple[Any, ...], other: Path) -> None:
    path = folder / file
    raw = path.read_bytes() if path.exists() else b""
    if how[0] == "truncate":
        path.write_bytes(raw[:int(len(raw) * how[1])])
    elif how[0] == "flip" and raw:
        at = min(int(len(raw) * how[1]), len(raw) - 1)
        path.write_bytes(raw[:at] + bytes([raw[at] ^ (1 << how[2])]) + raw[at + 1:])
    elif how[0] == "delete":
        path.unlink(missing_ok=True)
    elif how[0] == "empty":
        path.write_bytes(b"")
    elif how[0] == "junk":
        (folder / f"{file}.junk").write_bytes(b"\x00" * 64)
    elif (other / file).exists():
        shutil.copyfile(other / file, path)


@fuzz_settings(60, deadline_s=10)
@given(data=st.data(), layout=st.sampled_from(("folder", "only .previous", "damaged, .previous good",
                                               "a file", "an empty folder", "nothing")))
def test_load_damaged_checkpoint(world, data, layout):
    compiled = restored(world)
    base = world.corpus[data.draw(st.sampled_from(sorted(world.corpus)), label="checkpoint")]
    path = world.folder / f"case-{next(_cases)}"
    if layout == "a file":
        path.write_text("not a checkpoint")
    elif layout == "an empty folder":
        path.mkdir()
    elif layout != "nothing":
        shutil.copytree(base, path)
        for _ in range(data.draw(st.integers(0, 3), label="number of damages")):
            if not os.listdir(path):
                break
            file = data.draw(st.sampled_from(sorted(os.listdir(path))), label="file")
            damage(path, file, data.draw(damages, label="damage"), world.corpus["another model"])
        if layout == "only .previous":
            path.rename(f"{path}.previous")
        elif layout == "damaged, .previous good":
            shutil.copytree(world.corpus["good"], f"{path}.previous")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = accepted(autopar.load, compiled, str(path), mention="checkpoint")
    if extra is None:
        assert same(snapshot(compiled), world.before), "a failed load changed the model"
    else:
        assert isinstance(extra, dict)


class Crash(Exception):
    """The fault a fuzz case injects."""


@fuzz_settings(30, deadline_s=10)
@given(fault_at=st.integers(0, 8), fault=st.sampled_from((OSError(28, "No space left on device"),
                                                          KeyboardInterrupt(), Crash("power cut"))))
def test_failed_save_leaves_a_loadable_checkpoint(world, fault_at, fault):
    """Fail the n-th rename or removal of a save (DCP's own included): the path then loads, as the
    previous checkpoint or the new one; a save that returned loads as the new one."""
    compiled = restored(world)
    path = world.folder / f"save-{next(_cases)}"
    autopar.save(compiled, path)
    old = snapshot(compiled)["weights"]
    with torch.no_grad():
        for param in compiled.parameters():
            param.add_(0.5)
    new = snapshot(compiled)["weights"]
    calls = itertools.count()
    rename, rmtree = os.rename, shutil.rmtree

    def failing(real):
        def call(*args, **kwargs):
            if next(calls) == fault_at:
                raise fault
            return real(*args, **kwargs)
        return call

    try:
        with (hard_limit(), mock.patch("os.rename", failing(rename)),
              mock.patch("shutil.rmtree", failing(rmtree))):
            autopar.save(compiled, path)
        saved = True
    except (ValueError, OSError, KeyboardInterrupt, Crash):
        saved = False
    except BaseException as error:  # DCP's CheckpointException is a BaseException
        assert type(error).__name__ == "CheckpointException", error
        saved = False
    autopar.load(world.reader, path)
    weights = snapshot(world.reader)["weights"]
    assert same(weights, new) or (not saved and same(weights, old))


PASS_KEYS = ("passes.random_ltd.step", "passes.random_ltd.microbatch",
             "passes.random_ltd.consumed_layer_tokens", "passes.random_ltd", "passes.",
             "passes.random_ltd.other", "passes.not_a_pass.step", "passes.random_ltd.step.x")
state_values = st.one_of(
    st.integers(-3, 10), st.sampled_from((2**63 - 1, 2**63, 2**70, -(2**63))), json_values,
    st.builds(torch.tensor, st.integers(-3, 10) | st.floats(-2, 2) | st.booleans()),
    st.builds(lambda shape, dtype: torch.ones(shape, dtype=dtype),
              st.sampled_from(((), (0,), (1,), (2,), (1, 1))),
              st.sampled_from((torch.int64, torch.int32, torch.uint8, torch.float32, torch.bool,
                               torch.complex64))),
    st.just("delete"),
)


@fuzz_settings(80, deadline_s=10)
@given(changes=st.lists(st.tuples(st.sampled_from(PASS_KEYS), state_values), min_size=1, max_size=3))
def test_load_state_dict_pass_entries(world, changes):
    compiled = restored(world)
    state = {key: value.clone() for key, value in compiled.state_dict().items()}
    for key, value in changes:
        if isinstance(value, str) and value == "delete":
            state.pop(key, None)
        else:
            state[key] = value
    before = snapshot(compiled)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = accepted(compiled.load_state_dict, state, mention="state")
    if result is None:
        assert same(snapshot(compiled), before), "a failed load_state_dict changed the model"
    else:
        assert all(type(value) is int for value in compiled.pass_state["random_ltd"].values())
        compiled.state_dict()  # the loaded state can be saved again

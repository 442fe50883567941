"""Graph fingerprints: stable across processes, sensitive to what changes a plan."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from autopar.capture import capture
from autopar.plans import graph_fingerprint
from autopar.plans.fingerprint import canonical_graph_text


def mlp(hidden: int = 8, act: type[nn.Module] = nn.GELU) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, hidden), act(), nn.Linear(hidden, 2))


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.proj(x)) * self.scale
        return torch.nn.functional.softmax(y[:, :2] + x.sum(dim=-1, keepdim=True), dim=-1)


def test_fingerprint_is_stable() -> None:
    assert graph_fingerprint(fx.symbolic_trace(mlp())) == graph_fingerprint(
        fx.symbolic_trace(mlp()))
    fp = graph_fingerprint(fx.symbolic_trace(Functional()))
    assert fp == graph_fingerprint(fx.symbolic_trace(Functional())) and len(fp) == 16
    text = canonical_graph_text(fx.symbolic_trace(Functional()))
    assert "0x" not in text and "torch.relu" in text and "buffer scale: float32[4]" in text
    with pytest.raises(TypeError, match="fx.GraphModule"):
        graph_fingerprint(mlp())  # type: ignore[arg-type]


def test_fingerprint_is_the_same_in_another_process() -> None:
    code = ("from torch import fx; import sys; sys.path.insert(0, sys.argv[1]);"
            "from test_fingerprint import Functional, mlp; from autopar.plans import graph_fingerprint;"
            "print(graph_fingerprint(fx.symbolic_trace(Functional())),"
            " graph_fingerprint(fx.symbolic_trace(mlp())))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, check=True, timeout=120).stdout.split()
    assert out == [graph_fingerprint(fx.symbolic_trace(Functional())),
                   graph_fingerprint(fx.symbolic_trace(mlp()))]


def test_fingerprint_sees_changes() -> None:
    base = graph_fingerprint(fx.symbolic_trace(mlp()))
    assert graph_fingerprint(fx.symbolic_trace(mlp(hidden=16))) != base  # parameter shapes
    assert graph_fingerprint(fx.symbolic_trace(mlp(act=nn.ReLU))) != base  # module class
    tanh = nn.Sequential(nn.Linear(4, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 2))
    assert graph_fingerprint(fx.symbolic_trace(tanh)) != base  # module settings


def test_fingerprint_sees_shapes() -> None:
    def shaped(batch: int) -> str:
        gm = fx.symbolic_trace(mlp())
        ShapeProp(gm).propagate(torch.randn(batch, 4))  # fills node.meta["tensor_meta"]
        return graph_fingerprint(gm)

    assert shaped(3) == shaped(3) != shaped(5)
    assert shaped(3) != graph_fingerprint(fx.symbolic_trace(mlp()))

    def captured(batch: int, frontend: str) -> str:
        return graph_fingerprint(capture(mlp(), torch.randn(batch, 4),
                                         frontend=frontend).graph_module)  # type: ignore[arg-type]

    for frontend in ("fx", "export"):  # node.meta["autopar"] (a NodeRecord)
        assert captured(3, frontend) == captured(3, frontend) != captured(5, frontend)

    def exported(batch: int) -> str:  # node.meta["val"] only
        return graph_fingerprint(torch.export.export(mlp(), (torch.randn(batch, 4),)).module())

    assert exported(3) == exported(3) != exported(5)


class Positions(nn.Module):
    """A factory call with a device argument in the exported graph (``arange(..., device=...)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + torch.arange(x.shape[-1], device=x.device, dtype=x.dtype)


def test_fingerprint_ignores_the_device() -> None:
    """A graph exported on meta (how ``autopar plan`` builds models) fingerprints as on CPU."""
    def exported(device: str) -> tuple[str, str]:
        with torch.device(device):
            model, x = Positions(), torch.zeros(2, 4)
        gm = capture(model, x, frontend="export").graph_module  # type: ignore[arg-type]
        return graph_fingerprint(gm), canonical_graph_text(gm)

    (meta, meta_text), (cpu, _) = exported("meta"), exported("cpu")
    assert "device: device" in meta_text and "meta" not in meta_text
    assert meta == cpu


GPT2_CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_embd": 32,
               "n_head": 4, "vocab_size": 64, "n_positions": 16, "bos_token_id": 0, "eos_token_id": 0}
FACTORY = '''
import transformers

def tiny_gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, use_cache=False)
    return transformers.GPT2LMHeadModel(config)
'''


@pytest.mark.parametrize("source, cluster", [
    ("config", "local:2"),          # HF config.json, fp32 on CPU processes
    ("config", "1x2xA100-80GB"),    # priced bf16 on a GPU cluster, run as built
    ("gpt-tiny", "1x2xA100-80GB"),  # a zoo name
    ("module", "local:2"),          # module:factory returning an HF model
])
def test_cli_plan_applies_to_the_model_the_same_source_builds(source, cluster, tmp_path, monkeypatch,
                                                             capsys) -> None:
    """Issue 16 item 6: ``autopar plan MODEL -o p.json`` builds MODEL on meta (and prices bf16 on GPU
    clusters); the plan's fingerprint must be that of the model MODEL builds on a real device, captured
    at the plan's microbatch, as ``autopar.compile(model, ..., plan=p)`` captures it."""
    import json

    pytest.importorskip("transformers")
    from autopar.cli.main import main
    from autopar.lower import lower
    from autopar.model_source import resolve
    from autopar.plans import Plan

    spec = source
    if source == "config":
        spec = str(tmp_path / "config.json")
        (tmp_path / "config.json").write_text(json.dumps(GPT2_CONFIG))
    elif source == "module":
        (tmp_path / "fp_factory_models.py").write_text(FACTORY)
        monkeypatch.syspath_prepend(str(tmp_path))
        spec = "fp_factory_models:tiny_gpt2"
    out = tmp_path / "p.json"
    code = main(["--no-color", "plan", spec, "--cluster", cluster, "--batch", "4", "--seq", "16",
                 "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    plan = Plan.load(out)
    built = resolve(spec, batch_size=4, seq_len=16, device="cpu")
    program = lower(built.model, built.args, example_kwargs=built.kwargs,
                    microbatch_size=plan.schedule.microbatch_size)
    assert program.fingerprint == plan.graph_fingerprint
    Plan.load(out, expect_fingerprint=program.fingerprint)  # what compile(plan=...) checks

"""The engine finds a tied weight on a stage under any of its names (``engine._find_param``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autopar.runtime.engine import _find_param


def _stage() -> nn.Module:
    """A first stage whose wrapped module kept the tied weight under the LM head's name only, as
    FSDP2 leaves a tied GPT-2 (``transformer.wte.weight`` is ``lm_head.weight``) on pp2 × dp2."""
    stage = nn.Module()
    stage.lm_head = nn.Linear(4, 8, bias=False)
    stage.wpe = nn.Embedding(4, 4)
    return stage


def test_a_tied_weight_is_found_under_another_name_of_its_group() -> None:
    stage = _stage()
    assert _find_param(stage, ["transformer.wte.weight", "lm_head.weight"]) is stage.lm_head.weight
    assert _find_param(stage, ["wpe.weight"]) is stage.wpe.weight
    assert isinstance(stage.lm_head.weight, torch.nn.Parameter)


def test_a_missing_tied_weight_names_what_the_stage_has() -> None:
    with pytest.raises(KeyError, match=r"'transformer.wte.weight'.*lm_head.weight"):
        _find_param(_stage(), ["transformer.wte.weight", "embed.weight"])


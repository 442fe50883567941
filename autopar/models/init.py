"""GPT-2/BERT weight initialization: normal(0, 0.02) weights, zero biases, unit norms.

Skipped on the ``meta`` device, where there is no data to initialize.
"""

from __future__ import annotations

import torch
from torch import nn

STD = 0.02


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """Initialize every Linear, Embedding and LayerNorm of ``model`` in place."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if module.weight.device.type != "meta":
                module.weight.normal_(0.0, STD)
        if isinstance(module, nn.Linear) and module.bias is not None and module.bias.device.type != "meta":
            module.bias.zero_()
        if isinstance(module, nn.LayerNorm) and module.weight.device.type != "meta":
            module.weight.fill_(1.0)
            module.bias.zero_()


def embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An ``nn.Embedding`` left uninitialized (``init_weights`` fills it).

    ``nn.Embedding``'s own ``normal_`` init on ``meta`` costs about a second on first use
    (it imports torch's Python decompositions); handing it an empty weight skips that.
    """
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))

"""Mixture of Experts by sparse upcycling, as a graph pass: ``autopar.passes.MoE``.

Data flow: ``MoE(...)`` (``config``: the fields and their validation) → ``transform.moe_pass`` on an
annotated graph finds each chosen layer's feed-forward block (``ffn``: fx or exported graphs; ``hf``:
a model's own sparse blocks, HF Mixtral) and puts an MoE layer in its place (``layer``: router,
capacity, dispatch and combine; ``gates``: top-k and the dense-to-sparse gate) → the cost model
reads the nodes' ``autopar_moe`` records, the runtime splits experts over ranks
(``autopar.runtime.expert_parallel``), and ``moe_aux_loss`` adds the balance and z losses.
"""

from autopar.passes.moe.layer import MoELayer, MoEStats
from autopar.passes.moe.transform import (
    RECORD_KEY,
    MoE,
    MoENodeRecord,
    MoERecord,
    moe_aux_loss,
    moe_layers,
    moe_pass,
    moe_runtime,
    moe_stats,
)

__all__ = ["RECORD_KEY", "MoE", "MoELayer", "MoENodeRecord", "MoERecord", "MoEStats", "moe_aux_loss",
           "moe_layers", "moe_pass", "moe_runtime", "moe_stats"]

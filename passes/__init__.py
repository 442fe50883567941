"""Graph passes over captured graphs, imported as ``autopar.passes``.

Data flow: ``autopar.capture`` → annotated ``fx.GraphModule`` → passes (each a
``*_pass(gm, ctx) -> gm`` function behind a config object, applied in order by
:func:`run_passes`) → cost models, planner, runtime. ``autopar.transform`` runs them
on a model. Random layerwise token dropping, Mixture-of-Experts routing and fused
attention each add their pass here, one package each (``moe``, ``random_ltd``,
``fused_attention``); what a pass changes in the cost lives behind ``PricedPass.time_profile`` or
in the node records the cost model reads.

Layer: above ``cost_models`` and ``kernels``, below ``planner`` and ``runtime``.
"""

from autopar.passes.fused_attention import FusedAttention
from autopar.passes.moe import MoE
from autopar.passes.random_ltd import RandomLTD
from autopar.passes.runner import GraphPass, PassContext, PassError, PricedPass, check_passes, run_passes
from autopar.passes.runner import time_profile as time_profile  # explicit re-export (PEP 484)

__all__ = [
    "FusedAttention", "GraphPass", "MoE", "PassContext", "PassError", "PricedPass", "RandomLTD",
    "check_passes", "run_passes", "time_profile",
]

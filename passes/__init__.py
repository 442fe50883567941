"""Graph passes over captured graphs, imported as ``autopar.passes``.

Data flow: ``autopar.capture`` → annotated ``fx.GraphModule`` → passes (each a
``*_pass(gm, ctx) -> gm`` function, applied in order by one runner) → cost models
and planner. Random layerwise token dropping, Mixture-of-Experts routing and fused
attention land here with their own issues; this package exists now so that the
import name is fixed (``autopar.passes``, never a bare ``passes``).
"""

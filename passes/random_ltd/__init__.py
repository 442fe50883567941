"""Random layerwise token dropping (DeepSpeed's random-LTD), as a graph pass: ``autopar.passes.RandomLTD``.

Data flow: ``RandomLTD(...)`` → ``transform.random_ltd_pass`` rewrites the chosen layers of an annotated
graph to gather a random, order-preserving subset of each sample's tokens before the layer and
scatter the result back after it; ``schedule`` holds the kept-length schedule and the run-time module
(``gm.random_ltd``) that draws the tokens per (seed, step, layer, sample). The cost model prices the
layers at the schedule's average (``RandomLTD.time_profile`` → ``cost_models.token_dropping``).
"""

from autopar.passes.random_ltd.transform import (
    RandomLTD,
    RandomLTDRecord,
    kept_fractions,
    random_ltd_pass,
    random_ltd_runtime,
)

__all__ = ["RandomLTD", "RandomLTDRecord", "kept_fractions", "random_ltd_pass", "random_ltd_runtime"]

"""What token dropping does to the cost model's profile: layers that keep a fraction of their tokens.

Data flow: ``autopar.passes.RandomLTD`` records the kept fraction of each dropping layer on the
graph → the pass's ``time_profile`` hook (called once by ``autopar.lower``) → :func:`ltd_profile`
→ the ``ModelProfile`` that the planner and ``estimate`` price time with (memory is still
checked at full length, on the unscaled profile).
"""

from __future__ import annotations

import dataclasses

from autopar.cost_models.profile import LayerProfile, ModelProfile


def ltd_profile(profile: ModelProfile, kept: dict[int, float]) -> ModelProfile:
    """``profile`` with layer ℓ keeping the fraction ``kept[ℓ]`` = r of its tokens.

    A transformer layer's attention-score FLOPs (``4s²h`` forward, twice that backward) scale by
    r², the rest (linear in tokens) by r; its ``seq_len`` becomes round(r·s), so the compute and
    memory models see the shorter sequence. A layer of unknown shape scales by r throughout.
    The gather/scatter copies are not modelled (memory-bound, ``O(b s h)`` per layer).
    """
    layers = list(profile.layers)
    for index, fraction in kept.items():
        if type(index) is not int or not 0 <= index < len(layers):
            raise ValueError(f"kept names layer {index!r}, but the profile has {len(layers)} layers: "
                             f"expected indices in [0, {len(layers)})")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"kept[{index}] = {fraction!r} is invalid: expected a fraction in (0, 1]")
        layers[index] = _scaled_layer(layers[index], float(fraction))
    return dataclasses.replace(profile, layers=tuple(layers))


def _scaled_layer(layer: LayerProfile, r: float) -> LayerProfile:
    if not layer.is_transformer:
        return dataclasses.replace(layer, flops_fwd=layer.flops_fwd * r, flops_bwd=layer.flops_bwd * r,
                                   activation_bytes=layer.activation_bytes * r)
    s, h = layer.seq_len, layer.hidden_size
    attention = 4 * s * s * h  # type: ignore[operator]
    fwd = r * (layer.flops_fwd - attention) + r * r * attention
    bwd = r * (layer.flops_bwd - 2 * attention) + r * r * 2 * attention
    return dataclasses.replace(layer, flops_fwd=fwd, flops_bwd=bwd, seq_len=max(1, round(r * s)),  # type: ignore[operator]
                               activation_bytes=layer.activation_bytes * r)

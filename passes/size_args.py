"""Where a graph node holds a literal size: ATen ops and tensor methods whose shape argument may
bake in a token count or sequence length. Shared by the passes that change such sizes (random-LTD
runs layers on fewer tokens; MoE experts run on the tokens routed to them)."""

SIZE_ARG = {  # ATen op → the position of its shape argument
    "aten.view.default": 1, "aten.reshape.default": 1, "aten._unsafe_view.default": 1,
    "aten.expand.default": 1, "aten.new_zeros.default": 1, "aten.new_ones.default": 1,
    "aten.new_empty.default": 1, "aten.new_full.default": 1, "aten.zeros.default": 0,
    "aten.ones.default": 0, "aten.empty.memory_format": 0, "aten.full.default": 0,
}
SIZE_METHODS = ("view", "reshape", "expand", "new_zeros", "new_ones", "new_empty")
"""Tensor methods that take sizes as varargs or one list (fx graphs)."""

"""``ModelProfile``: the torch-free summary of a model that every cost model reads.

Data flow: ``autopar.capture`` → :meth:`ModelProfile.from_captured` (or
:meth:`ModelProfile.gpt` from a zoo ``GPTConfig``, analytically) → the compute, memory and
schedule models and ``autopar.cost_models.estimate``. It holds per-layer FLOPs and parameter
counts (and, for transformer layers, the shapes the compute and memory models need), the
parts outside the repeated layers (embedding before the first layer, LM head after the
last), the vocabulary and the training dtype. FLOPs are *per sequence* (one sample of
``seq_len`` tokens); the models multiply by the microbatch size. Counts follow capture:
a matmul (m×k)(k×n) is 2mkn FLOPs, attention is counted without the causal saving.

A captured layer is summarized in the shape of the GPT layer the compute model prices (QKV
``h → 3h``, projection, a 2-matmul MLP of width ``f``, Megatron-LM's ``24 b s h² + 4 b s² h`` at
``f = 4h``): its ``ffn_size`` is the width that gives the layer's *counted* forward FLOPs
(:func:`_gpt_equivalent_ffn`), so a gated MLP (SwiGLU: three matrices), grouped-query attention
(narrower K and V) or any other arrangement of the same matmuls costs what the same FLOPs cost
in a zoo GPT. Attention is causal when SDPA says so or when its mask compares query with key
positions (:func:`_sdpa_is_causal`; Hugging Face builds such masks instead of ``is_causal``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from autopar.cost_models.moe import MoELayerProfile
from autopar.hardware import DTYPE_BYTES, canonical_dtype

_ELEMENT_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4}
_ATTENTION_WORDS = ("attn", "attention")


@dataclass(frozen=True, kw_only=True)
class LayerProfile:
    """One repeated layer. Shapes are None where the layer is not a recognized transformer;
    ``activation_bytes`` (per sequence, training dtype) is what its forward writes, used by the
    memory model only for such layers. ``param_tensors`` counts its parameter tensors (0:
    unknown), which the CPU optimizer model needs (torch's AdamW loops over tensors on CPU).
    ``moe``: the layer's MLP is a Mixture of Experts (``cost_models.moe``); then ``ffn_size`` is one
    expert's width and ``param_count``, ``flops_*`` include every expert and the router.
    ``kv_heads``: the key/value heads of its attention (fewer than ``num_heads`` under grouped-query
    attention; None: as many as query heads), what ring attention sends (``context_parallel``);
    FLOPs do not use it (``ffn_size`` already folds narrower K/V in)."""

    name: str
    flops_fwd: float
    flops_bwd: float
    param_count: int
    hidden_size: int | None = None
    num_heads: int | None = None
    seq_len: int | None = None
    ffn_size: int | None = None
    activation_bytes: float = 0.0
    param_tensors: int = 0
    moe: MoELayerProfile | None = None
    kv_heads: int | None = None

    @property
    def is_transformer(self) -> bool:
        return None not in (self.hidden_size, self.num_heads, self.seq_len, self.ffn_size)

    @property
    def key_value_heads(self) -> int | None:
        """``kv_heads``, or ``num_heads`` when the layer has as many K/V heads as query heads."""
        return self.kv_heads if self.kv_heads is not None else self.num_heads


@dataclass(frozen=True, kw_only=True)
class ModelProfile:
    """Per-sequence FLOPs and parameter counts of a model, plus what the cost model needs.

    ``embedding_*`` covers nodes before the first layer, ``head_*`` nodes after it (final
    norm, LM head, loss). ``head_params`` excludes a weight tied to the embedding
    (``tied_embeddings``); a pipeline's last stage still holds a copy of it.
    ``fused_attention`` says whether attention runs as one fused (flash) kernel.
    ``*_param_tensors`` count parameter tensors outside the layers (0: unknown).
    """

    name: str
    layers: tuple[LayerProfile, ...]
    seq_len: int
    hidden_size: int
    vocab_size: int
    embedding_params: int
    embedding_flops_fwd: float
    head_params: int
    head_flops_fwd: float
    head_flops_bwd: float
    tied_embeddings: bool
    dtype: str = "bf16"
    fused_attention: bool = True
    causal: bool = True
    embedding_param_tensors: int = 0
    head_param_tensors: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        for name in ("seq_len", "hidden_size"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"ModelProfile.{name} = {getattr(self, name)!r}: expected an int >= 1")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def bytes_per_element(self) -> int:
        """Bytes of one activation/weight element in the training dtype."""
        return DTYPE_BYTES[self.dtype]

    @property
    def param_count(self) -> int:
        """Unique parameters (a tied weight once)."""
        return sum(layer.param_count for layer in self.layers) + self.embedding_params + self.head_params

    @property
    def tied_head_params(self) -> int:
        """Parameters of the LM-head weight shared with the embedding (0 if untied)."""
        return self.vocab_size * self.hidden_size if self.tied_embeddings else 0

    @property
    def model_flops_per_sequence(self) -> float:
        """Forward + backward FLOPs of one sequence, no recomputation (MFU's numerator)."""
        layers = sum(layer.flops_fwd + layer.flops_bwd for layer in self.layers)
        return layers + 3 * self.embedding_flops_fwd + self.head_flops_fwd + self.head_flops_bwd

    def param_tensors(self, layer: LayerProfile) -> int:
        """Parameter tensors of ``layer``; when unknown, 12 for a transformer layer (weight and
        bias of four linear layers and two LayerNorms), else 2."""
        return layer.param_tensors or (12 if layer.is_transformer else 2)

    @classmethod
    def gpt(cls, config: Any, *, name: str = "gpt", dtype: str = "bf16",
            fused_attention: bool = True) -> ModelProfile:
        """Analytic profile of a zoo ``GPTConfig`` (Megatron-LM's counts, TECHNIQUES §1)."""
        h, s, f, a, vocab = (config.hidden_size, config.seq_len, config.ffn_size, config.num_heads,
                             config.vocab_size)
        fwd = 8 * s * h * h + 4 * s * h * f + 4 * s * s * h  # QKV+proj, MLP, QKᵀ and attn·V
        layer_params = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
        scale = DTYPE_BYTES[canonical_dtype(dtype)] / 2
        written = (34 * s * h + 5 * a * s * s) * scale  # Korthikanti's count, no recomputation
        layers = tuple(
            LayerProfile(name=f"blocks.{i}", flops_fwd=fwd, flops_bwd=2 * fwd, param_count=layer_params,
                         hidden_size=h, num_heads=a, seq_len=s, ffn_size=f, activation_bytes=written,
                         param_tensors=12, kv_heads=a)
            for i in range(config.num_layers))
        tied = bool(config.tie_embeddings)
        return cls(name=name, layers=layers, seq_len=s, hidden_size=h, vocab_size=vocab,
                   embedding_params=(vocab + s) * h, embedding_flops_fwd=0.0,
                   head_params=2 * h + (0 if tied else vocab * h), head_flops_fwd=2 * s * h * vocab,
                   head_flops_bwd=4 * s * h * vocab, tied_embeddings=tied, dtype=dtype,
                   fused_attention=fused_attention, embedding_param_tensors=2,
                   head_param_tensors=2 + (0 if tied else 1))

    @classmethod
    def from_captured(cls, captured: Any, *, batch_size: int, name: str | None = None,
                      dtype: str | None = None, fused_attention: bool | None = None) -> ModelProfile:
        """Summarize a ``Captured`` made on an example batch of ``batch_size`` sequences.

        Layer FLOPs come from ``captured.layers`` divided by ``batch_size``; shapes and the
        parts outside the layers from the node records. ``dtype`` defaults to the dtype of the
        model's parameters — what the runtime trains in (bf16 for a model without
        parameters). ``fused_attention`` defaults to whether the graph calls
        ``scaled_dot_product_attention`` (``causal`` to :func:`_sdpa_is_causal`); nodes between
        stacks of layers count with the head. Layers the MoE pass transformed
        (``node.meta["autopar_moe"]``) get their FLOPs and parameters from the transformed graph
        and a ``moe`` record (:func:`_moe_layers`).
        """
        if type(batch_size) is not int or batch_size < 1:
            raise ValueError(f"batch_size = {batch_size!r}: expected the int >= 1 used for capture")
        dtype = dtype if dtype is not None else _parameter_dtype(captured.graph_module)
        nodes = [(node, record) for node, record in captured.records()]
        layer_nodes = [i for i, (_, record) in enumerate(nodes) if record.layer is not None]
        first = layer_nodes[0] if layer_nodes else len(nodes)
        outside = [(i < first, record) for i, (_, record) in enumerate(nodes) if record.layer is None]
        shapes = [_layer_shapes(nodes, info.index, info.flops_fwd / batch_size) for info in captured.layers]
        scale = DTYPE_BYTES[canonical_dtype(dtype)] / batch_size
        written = [sum(r.bytes_written / _ELEMENT_BYTES.get(r.dtypes[0], 4) for _, r in nodes
                       if r.layer == info.index and r.dtypes) * scale for info in captured.layers]
        layers = tuple(
            LayerProfile(name=info.name, flops_fwd=info.flops_fwd / batch_size,
                         flops_bwd=info.flops_bwd / batch_size, param_count=info.param_count,
                         activation_bytes=act, param_tensors=tensors, **shape)
            for info, shape, act, tensors in zip(captured.layers, shapes, written,
                                                 _layer_tensors(captured, len(captured.layers)), strict=True))
        layers = _moe_layers(captured, layers, batch_size)
        seq, hidden = _sequence_and_hidden(captured, shapes)
        vocab = _vocab_size(nodes)
        head = [record for before, record in outside if not before]
        head_params = sum(_param_count(r) for r in head)
        sdpa = [node for node, _ in nodes if "scaled_dot_product" in str(node.target)]
        gm, seen = captured.graph_module, set()  # a weight tied to the embedding counts there
        return cls(
            name=name or captured.model_name, layers=layers, seq_len=seq, hidden_size=hidden,
            vocab_size=vocab,
            embedding_params=sum(_param_count(r) for before, r in outside if before),
            embedding_flops_fwd=sum(r.flops_fwd for before, r in outside if before) / batch_size,
            head_params=head_params, head_flops_fwd=sum(r.flops_fwd for r in head) / batch_size,
            head_flops_bwd=sum(r.flops_bwd for r in head) / batch_size,
            tied_embeddings=vocab > 0 and head_params < vocab * hidden, dtype=dtype,
            fused_attention=bool(sdpa) if fused_attention is None else fused_attention,
            causal=any(_sdpa_is_causal(node) for node in sdpa) if sdpa else True,
            embedding_param_tensors=_tensor_count(gm, [n for n, r in nodes[:first] if r.layer is None], seen),
            head_param_tensors=_tensor_count(gm, [n for n, r in nodes[first:] if r.layer is None], seen))


def _moe_layers(captured: Any, layers: tuple[LayerProfile, ...], batch_size: int) -> tuple[LayerProfile, ...]:
    """``layers`` with those holding an MoE node (``autopar.passes.moe``) rebuilt: FLOPs summed over
    the transformed graph's nodes; ``ffn_size`` the width ``f`` of the 2-matmul MLP with the
    expert's weight-matrix parameters, ``2hf`` (``f`` itself for an upcycled GPT MLP, ``1.5 f`` for
    a gated SwiGLU expert: the same FLOPs per routed token).

    Parameters: what capture counted for the layer (the model's block, before the pass), less what
    the pass took out, plus the MoE module's own (exactly its ``NodeRecord.param_bytes``, counted
    here in elements since the router is fp32 beside 16-bit experts). An adopted block
    (``adopted``: HF Mixtral's own experts) is replaced by a module holding the same ``E`` experts
    and router: nothing added. An upcycled layer loses its dense MLP (one expert's parameters) and
    gains ``E`` experts and the router, and with Residual-MoE (``residual``) the dense MLP again and
    the coefficient ``Linear(h, 2)``."""
    found = {}
    for node, record in captured.records():
        info = node.meta.get("autopar_moe")
        if info is not None and record.layer is not None and record.layer < len(layers):
            found[record.layer] = (node, info)
    if not found:
        return layers
    gm, out = captured.graph_module, list(layers)
    for index, (node, info) in found.items():
        module = gm.get_submodule(str(node.target))
        expert = sum(p.numel() for p in module.experts[0].parameters())
        total = sum(p.numel() for p in module.parameters())
        router = sum(p.numel() for p in module.router.parameters())
        adopted = bool(getattr(info, "adopted", False))
        moe = MoELayerProfile(num_experts=info.num_experts, top_k=info.top_k,
                              capacity_factor=float(info.capacity_factor), expert_param_count=expert,
                              router_param_count=router, dropless=bool(getattr(info, "dropless", False)),
                              residual=bool(getattr(info, "residual", False)),
                              residual_param_count=total - info.num_experts * expert - router,
                              gate=str(getattr(info, "gate", "topk")))
        layer, mine = layers[index], [r for _, r in captured.records() if r.layer == index]
        matrices = sum(p.numel() for p in module.experts[0].parameters() if p.dim() >= 2)
        removed = total if adopted else expert
        out[index] = dataclasses.replace(
            layer, moe=moe, ffn_size=max(1, round(matrices / (2 * (layer.hidden_size or 1)))),
            flops_fwd=sum(r.flops_fwd for r in mine) / batch_size,
            flops_bwd=sum(r.flops_bwd for r in mine) / batch_size,
            param_count=layer.param_count - removed + total)
    return tuple(out)


def _parameter_dtype(gm: Any) -> str:
    param = next(iter(gm.parameters()), None)
    return "bf16" if param is None else canonical_dtype(str(param.dtype))


def _node_params(gm: Any, node: Any) -> list[Any]:
    """The parameters a node owns: a leaf module's, or the one a ``get_attr`` reads."""
    if node.op == "call_module":
        return list(gm.get_submodule(str(node.target)).parameters())
    if node.op == "get_attr":
        target = gm
        for part in str(node.target).split("."):
            target = getattr(target, part, None)
        return [target] if getattr(target, "requires_grad", False) else []
    return []


def _tensor_count(gm: Any, nodes: list[Any], seen: set[int] | None = None) -> int:
    unique = {id(p) for node in nodes for p in _node_params(gm, node)}
    if seen is not None:
        unique -= seen
        seen |= unique
    return len(unique)


def _layer_tensors(captured: Any, num_layers: int) -> list[int]:
    by_layer: list[list[Any]] = [[] for _ in range(num_layers)]
    for node, record in captured.records():
        if record.layer is not None and record.layer < num_layers:
            by_layer[record.layer].append(node)
    return [_tensor_count(captured.graph_module, nodes) for nodes in by_layer]


def _param_count(record: Any) -> int:
    size = _ELEMENT_BYTES.get(record.dtypes[0], 4) if record.dtypes else 4
    return record.param_bytes // size


def _layer_shapes(nodes: list[tuple[Any, Any]], index: int, flops_fwd: float) -> dict[str, int | None]:
    """hidden, seq from the layer's last (b, s, h) output; heads from a (b, a, s, h/a) tensor; key/value
    heads from the attention's projections (:func:`_kv_heads`). A layer is a transformer layer when
    it also holds a parameter-owning matmul outside attention modules (a leaf module with parameters
    in fx graphs, or an op reading a parameter through ``get_attr`` in exported graphs, where the node
    that multiplies owns no parameter bytes itself); its ``ffn_size`` is then
    :func:`_gpt_equivalent_ffn` of its forward FLOPs (per sequence)."""
    mine = [(node, record) for node, record in nodes if record.layer == index]
    outputs = [record.shapes[0] for _, record in mine if record.shapes and len(record.shapes[0]) == 3]
    if not outputs:
        return {}
    batch, seq, hidden = outputs[-1]
    heads = next((shape[1] for _, record in mine for shape in record.shapes
                  if len(shape) == 4 and shape[2] == seq and shape[1] * shape[3] == hidden), None)
    weights = {node for node, record in mine if node.op == "get_attr" and record.param_bytes > 0}

    def projects(node: Any, record: Any) -> bool:  # a matmul with a parameter
        return bool(record.flops_fwd > 0 and record.shapes
                    and (record.param_bytes > 0 or any(arg in weights for arg in node.all_input_nodes)))

    def in_attention(record: Any) -> bool:
        return any(word in record.module_path.lower() for word in _ATTENTION_WORDS)

    has_mlp = any(projects(node, record) and not in_attention(record) for node, record in mine)
    widths = [record.shapes[0][-1] for node, record in mine if projects(node, record) and in_attention(record)
              and math.prod(record.shapes[0][:-1]) == batch * seq]
    ffn = _gpt_equivalent_ffn(flops_fwd, seq=seq, hidden=hidden) if has_mlp else None
    return {"hidden_size": hidden, "seq_len": seq, "num_heads": heads, "ffn_size": ffn,
            "kv_heads": _kv_heads(widths, hidden=hidden, heads=heads)}


def _kv_heads(widths: list[int], *, hidden: int, heads: int | None) -> int | None:
    """Key/value heads from the output widths of an attention's projections (one row per token):
    Q and the output projection are ``h`` wide, K and V ``kv·d`` each (``d = h / heads``), fused or
    not, so ``kv = (Σ widths − 2h) / 2d`` (Llama-3-8B: 4096 + 1024 + 1024 + 4096 → 8 of 32 heads).
    None (as many as query heads) when the widths do not read that way."""
    if not heads or hidden % heads:
        return None
    kv_width, head_dim = sum(widths) - 2 * hidden, hidden // heads
    if kv_width <= 0 or kv_width % (2 * head_dim):
        return None
    kv = kv_width // (2 * head_dim)
    return kv if kv <= heads and heads % kv == 0 else None


def _gpt_equivalent_ffn(flops_fwd: float, *, seq: int, hidden: int) -> int:
    """The MLP width ``f`` of the GPT layer with ``flops_fwd`` forward FLOPs per sequence:
    ``8 s h² + 4 s h f + 4 s² h = flops_fwd`` (Megatron-LM's count, Narayanan et al. SC'21, with
    ``f`` for ``4h``). GPT-2's ``f`` is its own 4h; a Llama layer (attention ``2h² + 2h·kv``
    with ``kv`` the K/V width, SwiGLU ``3hf``) gets ``f' = (2h² + 2h·kv + 3hf − 4h²) / 2h``:
    Llama-3-8B (h 4096, kv 1024, f 14336) is priced as a GPT layer with f' = 18432."""
    s, h = seq, hidden
    return max(1, round((flops_fwd - 8 * s * h * h - 4 * s * s * h) / (4 * s * h)))


_CAUSAL_MASK_OPS = frozenset({"tril", "triu"})
_POSITION_COMPARISONS = frozenset({"le", "lt", "ge", "gt", "__le__", "__lt__", "__ge__", "__gt__"})
_MASK_SEARCH_NODES = 512  # a mask is built by a few dozen ops (Hugging Face: ~40)


def _sdpa_is_causal(node: Any) -> bool:
    """Whether an SDPA call attends causally: ``is_causal``, or an ``attn_mask`` built from a
    ``tril``/``triu`` or from comparing query positions ``(…, s, 1)`` with key positions
    ``(…, 1, s)`` (Hugging Face's ``create_causal_mask``: ``kv_idx <= q_idx``). A padding mask
    (BERT's ``mask >= 0``) or a relative-position bias (T5) compares with scalars: not causal."""
    if node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False) is True:
        return True
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    seen, todo = set(), [mask] if hasattr(mask, "all_input_nodes") else []
    while todo and len(seen) < _MASK_SEARCH_NODES:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        name = _op_name(current)
        if name in _CAUSAL_MASK_OPS or name in _POSITION_COMPARISONS and _compares_rows_with_columns(current):
            return True
        todo.extend(current.all_input_nodes)
    return False


def _op_name(node: Any) -> str:
    """``"le"`` for ``aten.le.Tensor``, ``torch.le``, ``operator.le`` or ``x.le`` (no module's name)."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    packet = getattr(target, "overloadpacket", None)  # an aten OpOverload
    return getattr(packet or target, "__name__", "") if node.op == "call_function" else ""


def _compares_rows_with_columns(node: Any) -> bool:
    """A comparison whose (…, s_q, s_k) result broadcasts a column against a row."""
    shapes = [arg.meta["autopar"].shapes[0] for arg in node.args[:2]
              if hasattr(arg, "meta") and getattr(arg.meta.get("autopar"), "shapes", None)]
    if len(shapes) != 2 or min(len(shape) for shape in shapes) < 2:
        return False
    return {(shape[-2] > 1, shape[-1] > 1) for shape in shapes} == {(True, False), (False, True)}


def _sequence_and_hidden(captured: Any, shapes: list[dict[str, int | None]]) -> tuple[int, int]:
    for shape in shapes:
        if shape.get("seq_len") and shape.get("hidden_size"):
            return int(shape["seq_len"]), int(shape["hidden_size"])
    args = captured.example_args
    seq = int(args[0].shape[1]) if args and getattr(args[0], "ndim", 0) >= 2 else 1
    return seq, 1


def _vocab_size(nodes: list[tuple[Any, Any]]) -> int:
    """The last dim of the graph's 3-D output (logits ``(b, s, V)``), else 0."""
    for node, record in reversed(nodes):
        if node.op == "output" or record.layer is not None:
            continue
        if record.shapes and len(record.shapes[0]) == 3 and record.flops_fwd > 0:
            return int(record.shapes[0][-1])
    return 0

"""Tensor-parallel rules (autopar.runtime.tensor_parallel) on a fake 2- or 4-rank mesh: a Plan's
colwise / rowwise / vocab shardings become DTensor placements — by output features for colwise, by
input features for rowwise, whatever the weight layout (``nn.Linear`` and ``aten.linear`` store
(out, in), ``aten.addmm`` (in, out)) — every other parameter is replicated, tied weights stay one
parameter, and the local shards have the divided shapes. Values need real collectives: the gloo
matrix in tests/distributed checks them."""

import copy

import pytest
import torch
from torch import fx, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import autopar
from autopar.plans import Sharding
from autopar.runtime.tensor_parallel import TensorParallelStage, shard_parameters
from tests.helpers.fake_pg import fake_process_group

H, V, LAYERS = 64, 128, 2  # the zoo GPT's defaults: ffn 4·H, 4 heads


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=LAYERS)
    inputs, _ = autopar.models.example_batch(model, batch_size=2, seq_len=8, seed=1)
    return autopar.capture(model, inputs).graph_module, inputs


def _megatron(num_layers: int) -> list[Sharding]:
    """Megatron's layout written by hand: column then row in attention and MLP, vocabulary-split
    embedding with its tied LM head split by columns."""
    rules = [Sharding(node="wte", strategy="vocab"), Sharding(node="lm_head", strategy="colwise")]
    for i in range(num_layers):
        rules += [Sharding(node=f"blocks_{i}_attn_qkv", strategy="colwise"),
                  Sharding(node=f"blocks_{i}_attn_proj", strategy="rowwise"),
                  Sharding(node=f"blocks_{i}_mlp_fc", strategy="colwise"),
                  Sharding(node=f"blocks_{i}_mlp_proj", strategy="rowwise")]
    return rules


def _expected(tp: int) -> dict[str, tuple[object, tuple[int, ...]]]:
    """Parameter name → (placement, local shape) for the sharded ones."""
    table = {"wte.weight": (Shard(0), (V // tp, H)), "lm_head.weight": (Shard(0), (V // tp, H))}
    for i in range(LAYERS):
        block = f"blocks.{i}"
        table |= {
            f"{block}.attn.qkv.weight": (Shard(0), (3 * H // tp, H)),
            f"{block}.attn.qkv.bias": (Shard(0), (3 * H // tp,)),
            f"{block}.attn.proj.weight": (Shard(1), (H, H // tp)),
            f"{block}.mlp.fc.weight": (Shard(0), (4 * H // tp, H)),
            f"{block}.mlp.fc.bias": (Shard(0), (4 * H // tp,)),
            f"{block}.mlp.proj.weight": (Shard(1), (H, 4 * H // tp)),
        }
    return table


@pytest.mark.parametrize("tp", [2, 4])
def test_megatron_shardings_become_placements(gpt, tp):
    graph, inputs = gpt
    gm = copy.deepcopy(graph)
    expected = _expected(tp)
    with fake_process_group(tp - 1, tp):
        mesh = init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
        shard_parameters(gm, _megatron(LAYERS), mesh)
        for name, param in gm.named_parameters(remove_duplicate=False):
            assert isinstance(param, nn.Parameter) and isinstance(param.data, DTensor), name
            assert param.device_mesh == mesh and param.shape == graph.get_parameter(name).shape, name
            whole = (Replicate(), tuple(param.shape))  # every parameter no rule names
            placement, local = expected.get(name, whole)
            assert param.placements == (placement,) and tuple(param.to_local().shape) == local, name
        assert gm.get_parameter("lm_head.weight") is gm.get_parameter("wte.weight")  # still tied
        logits = TensorParallelStage(gm, mesh)(inputs)  # DTensors inside, plain tensors out
        assert type(logits) is torch.Tensor and logits.shape == (*inputs.shape, V)


def _one_op_graph(target, weight_shape: tuple[int, int]) -> fx.GraphModule:
    """``y = op(x, weight, bias)`` as torch.export writes it (weights read by get_attr)."""
    root = nn.Module()
    root.weight = nn.Parameter(torch.randn(weight_shape))
    root.bias = nn.Parameter(torch.randn(6))
    graph = fx.Graph()
    x, weight, bias = graph.placeholder("x"), graph.get_attr("weight"), graph.get_attr("bias")
    args = (bias, x, weight) if target is torch.ops.aten.addmm.default else (x, weight, bias)
    graph.output(graph.call_function(target, args))
    return fx.GraphModule(root, graph)


@pytest.mark.parametrize(("target", "weight_shape", "strategy", "weight", "bias"), [
    (torch.ops.aten.linear.default, (6, 4), "colwise", (Shard(0), (3, 4)), (Shard(0), (3,))),
    (torch.ops.aten.linear.default, (6, 4), "rowwise", (Shard(1), (6, 2)), (Replicate(), (6,))),
    (torch.ops.aten.addmm.default, (4, 6), "colwise", (Shard(1), (4, 3)), (Shard(0), (3,))),  # HF Conv1D
    (torch.ops.aten.addmm.default, (4, 6), "rowwise", (Shard(0), (2, 6)), (Replicate(), (6,))),
])
def test_weight_layout_decides_the_sharded_dim(target, weight_shape, strategy, weight, bias):
    gm = _one_op_graph(target, weight_shape)
    node = next(n.name for n in gm.graph.nodes if n.op == "call_function")
    with fake_process_group(0, 2):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        shard_parameters(gm, [Sharding(node=node, strategy=strategy)], mesh)
        for name, (placement, local) in (("weight", weight), ("bias", bias)):
            param = gm.get_parameter(name)
            assert param.placements == (placement,) and tuple(param.to_local().shape) == local, name


def test_tp1_leaves_parameters_alone(gpt):
    gm = copy.deepcopy(gpt[0])
    with fake_process_group(1, 2):
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
        shard_parameters(gm, _megatron(LAYERS), mesh["tp"])
    assert not any(isinstance(p.data, DTensor) for p in gm.parameters())


@pytest.mark.parametrize(("sharding", "message"), [
    (Sharding(node="blocks_0_ln_1", strategy="colwise"), r"names node blocks_0_ln_1, which is not a linear"),
    (Sharding(node="blocks_0_attn_qkv", strategy="diagonal"), r"unknown sharding strategy 'diagonal'"),
])
def test_bad_shardings_are_named(gpt, sharding, message):
    gm = copy.deepcopy(gpt[0])
    with fake_process_group(0, 2), pytest.raises(ValueError, match=message):
        shard_parameters(gm, [sharding], init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))

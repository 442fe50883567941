"""Megatron sequence parallelism (Korthikanti et al. 2022) in the graph-level tensor parallelism
(autopar.runtime.tensor_parallel.sequence_parallel_pass): the rewrite on a fake 2-rank mesh, and
equivalence with one process on real gloo ranks (tests/helpers/distributed/sequence_parallel_workers)."""

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

import autopar
from autopar.plans.megatron import megatron_shardings
from autopar.runtime import spawn
from autopar.runtime.tensor_parallel import sequence_gathered, sequence_sharded, shard_parameters
from tests.helpers.distributed import sequence_parallel_workers as workers
from tests.helpers.fake_pg import fake_process_group

LAYERS = 2


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=LAYERS)
    inputs, _ = autopar.models.example_batch(model, batch_size=2, seq_len=8, seed=1)
    return autopar.capture(model, inputs).graph_module


def _calls(gm, function):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is function]


def test_rewrite_shards_between_row_and_column_linears(gpt):
    """Each row-parallel output and the vocabulary-parallel embedding become sequence shards (no
    all-reduce left); each column-parallel input is gathered, once per activation."""
    gm = copy.deepcopy(gpt)
    shardings = megatron_shardings(gm, 2)
    with fake_process_group(0, 2):
        shard_parameters(gm, shardings, init_device_mesh("cpu", (2,)), sequence_parallel=True)
    sharded = {n.args[0].name for n in _calls(gm, sequence_sharded)}
    rows = {s.node for s in shardings if s.strategy in ("rowwise", "vocab")}
    assert sharded == rows and len(rows) == 2 * LAYERS + 1, (sharded, rows)
    gathered = _calls(gm, sequence_gathered)
    readers = {u.name for n in gathered for u in n.users}
    assert readers == {s.node for s in shardings if s.strategy == "colwise"}, readers
    assert len(gathered) == 2 * LAYERS + 1  # q/k/v is one linear here; plus the LM head's input
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "replicated"]


def test_two_ranks_match_one_process():
    """tp2 + sequence parallelism on the zoo GPT and a hand-written GPT (separate q/k/v, manual causal
    attention, untied head): losses of 3 steps and every gradient equal one process; norms see seq/2
    tokens; the forward issues reduce-scatters and all-gathers, no all-reduce; with full and with
    selective recomputation; a sequence that tp does not divide is refused by name. Then, in the same
    processes (start-up costs more than a case), Hugging Face Llama (RMSNorm, SwiGLU, rotary) and GPT-2
    (Conv1D: addmm on flattened tokens) built from configs: equal to one process, norms on sequence
    shards, the forward's collectives counted."""
    pytest.importorskip("transformers")
    spawn(workers.two_rank_sequence_parallel, 2, timeout_s=90)


@pytest.mark.slow
def test_four_ranks_with_pipeline():
    """tp2 + sequence parallelism with pp2 (1F1B), and with dp2 under ZeRO-3, on the zoo GPT: equal
    to one process, every stage's norms on sequence shards."""
    spawn(workers.four_rank_sequence_parallel, 4, timeout_s=120)

"""The per-rank token loader: each dp rank reads only its shard and the shards make up the dp=1 batch,
cp ranks read the same rows, pipeline ranks read nothing, resume continues with the same next batch,
determinism per seed, held-out batches, FIM, curriculum options, and the errors."""

import json
import os

import pytest
import torch

from autopar.data import (
    CurriculumSampler,
    DifficultyIndex,
    FIMConfig,
    Pacing,
    TokenLoader,
    token_counts,
    undo_fim,
    vocabulary_rarity,
)

BATCH, SEQ = 8, 32


@pytest.fixture
def make(corpus, tokenizer, cache_dir):
    def build(**options):
        settings = {"global_batch_size": BATCH, "seq_len": SEQ, "seed": 3, "cache_dir": cache_dir} | options
        return TokenLoader(corpus, tokenizer, **settings)
    return build


def take(loader, steps):
    return [next(loader) for _ in range(steps)]


@pytest.mark.parametrize("dp", [2, 4])
def test_each_dp_rank_reads_only_its_shard(make, dp):
    whole = make()
    ranks = [make(dp_degree=dp, dp_rank=rank) for rank in range(dp)]
    reference = take(whole, 5)
    shards = [take(loader, 5) for loader in ranks]
    for step, batch in enumerate(reference):
        assert batch.tokens.shape == (BATCH, SEQ + 1) and batch.tokens.dtype == torch.int64
        parts = [shard[step] for shard in shards]
        assert all(part.tokens.shape == (BATCH // dp, SEQ + 1) for part in parts)
        assert torch.equal(torch.cat([part.tokens for part in parts]), batch.tokens)
        assert sum((part.rows for part in parts), ()) == batch.rows
        assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert whole.samples_read == 5 * BATCH
    assert [loader.samples_read for loader in ranks] == [5 * BATCH // dp] * dp


def test_cp_ranks_read_the_same_rows_and_pipeline_ranks_read_nothing(make):
    cp = [make(dp_degree=2, dp_rank=1, cp_degree=2, cp_rank=rank) for rank in range(2)]
    first, second = (take(loader, 3) for loader in cp)
    assert all(torch.equal(a.tokens, b.tokens) and a.tokens.shape == (BATCH // 2, SEQ + 1)
               for a, b in zip(first, second, strict=True))
    idle = make(dp_degree=2, dp_rank=1, reads_data=False)
    batches = take(idle, 3)
    assert all(b.tokens is None and b.inputs is None and b.targets is None for b in batches)
    assert idle.samples_read == 0 and idle.step == 3
    assert [b.rows for b in batches] == [b.rows for b in first]  # it keeps step with the readers
    assert list(idle.eval_batches(max_batches=2))[0].tokens is None and idle.eval_samples_read == 0


def test_resume_mid_epoch_continues_with_the_same_next_batch(make):
    uninterrupted = make()
    assert uninterrupted.steps_per_epoch < 100  # the run below crosses an epoch boundary
    expected = take(uninterrupted, 100)
    interrupted = make()
    take(interrupted, 37)
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert state["step"] == 37 and state["epoch"] == 0 and state["position"] == 37 and state["seed"] == 3
    resumed = make()
    resumed.load_state_dict(state)
    for want, got in zip(expected[37:], take(resumed, 63), strict=True):
        assert torch.equal(want.tokens, got.tokens) and (want.step, want.epoch) == (got.step, got.epoch)
    wider = make(dp_degree=2, dp_rank=1)  # a resumed run may change the dp degree
    wider.load_state_dict(state)
    assert torch.equal(next(wider).tokens, expected[37].tokens[BATCH // 2:])


def test_deterministic_per_seed_and_shuffled_per_epoch(make):
    a, b, c = make(seed=5), make(seed=5), make(seed=6)
    first = take(a, a.steps_per_epoch)
    again = take(b, a.steps_per_epoch)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(first, again, strict=True))
    assert not torch.equal(first[0].tokens, next(c).tokens)
    rows = [row for batch in first for row in batch.rows]
    assert len(set(rows)) == len(rows) == a.steps_per_epoch * BATCH  # an epoch draws each window once
    second = next(a)
    assert second.epoch == 1 and second.rows != first[0].rows
    window = a.windows[first[0].rows[0]]
    assert torch.equal(first[0].tokens[0], window) and window.shape == (SEQ + 1,)


def test_token_file_is_cached_and_reused(make):
    loader = make()
    mtime = os.stat(loader.stream.path).st_mtime_ns
    again = make()
    assert again.stream.path == loader.stream.path and os.stat(loader.stream.path).st_mtime_ns == mtime
    assert loader.stream.path.suffix == ".npy" and str(loader.stream.tokens.dtype) == "uint16"
    assert make(seed=4).stream.path == loader.stream.path  # the shuffle seed does not retokenize
    assert make(fim_rate=0.5).stream.path != loader.stream.path
    tokens = loader.stream.tokens.copy()
    broken = loader.stream.path.with_name("broken.npy")  # a new inode: open memory maps stay valid
    broken.write_bytes(b"truncated")
    os.replace(broken, loader.stream.path)
    rebuilt = make()
    assert (rebuilt.stream.tokens == tokens).all() and rebuilt.stream.num_tokens == tokens.shape[0]


def test_eval_batches_cover_the_heldout_split_per_rank(make):
    whole = make(seq_len=16)
    assert whole.describe().startswith("train: ")
    reference = list(whole.eval_batches(batch_size=4))
    assert len(reference) >= 2 and whole.step == 0 and whole.samples_read == 0
    assert [b.rows for b in reference] == [tuple(range(4 * i, 4 * i + 4)) for i in range(len(reference))]
    halves = [list(make(seq_len=16, dp_degree=2, dp_rank=r).eval_batches(batch_size=4)) for r in range(2)]
    for i, batch in enumerate(reference):
        assert torch.equal(torch.cat([halves[0][i].tokens, halves[1][i].tokens]), batch.tokens)
    assert len(list(whole.eval_batches(batch_size=4, max_batches=1))) == 1
    assert whole.eval_samples_read == 4 * len(reference) + 4
    with pytest.raises(ValueError, match="heldout split has .* fewer than the eval batch_size = 100000"):
        list(whole.eval_batches(batch_size=100_000))


def test_fim_is_applied_per_document_before_packing(make, tokenizer):
    plain, fim = make().stream, make(fim_rate=1.0).stream
    assert fim.num_tokens == plain.num_tokens + 3 * plain.num_documents

    def documents(tokens):
        return [d for d in " ".join(map(str, tokens.tolist())).split(f" {tokenizer.eot_id}") if d.strip()]

    config = FIMConfig(level="token", prefix=tokenizer.fim_prefix_id, suffix=tokenizer.fim_suffix_id,
                       middle=tokenizer.fim_middle_id)
    for original, transformed in zip(documents(plain.tokens), documents(fim.tokens), strict=True):
        ids = [int(t) for t in transformed.split()]
        assert ids[0] == tokenizer.fim_prefix_id
        assert undo_fim(ids, config) == [int(t) for t in original.split()]


def test_sequence_length_pacing_truncates_batches(make):
    pacing = Pacing(kind="linear", min_value=8, max_value=SEQ, num_steps=10)
    loader = make(seq_len_pacing=pacing)
    lengths = [batch.tokens.shape[1] for batch in take(loader, 12)]
    assert lengths[0] == 9 and lengths[5] == 21 and lengths[10:] == [SEQ + 1] * 2
    assert make(seq_len_pacing=lambda step: 9, cp_degree=2).paced_length(0) == 8  # a multiple of cp


def test_curriculum_sampler_draws_the_global_rows(make, tokenizer):
    plain = make()
    rarity = vocabulary_rarity(token_counts(plain.windows, vocab_size=tokenizer.vocab_size))
    index = DifficultyIndex.build(plain.windows, rarity)
    sampler = CurriculumSampler(index, Pacing(min_value=10, max_value=100, num_steps=20), batch_size=BATCH,
                                num_steps=20, seed=9)
    loaders = [make(sampler=sampler, dp_degree=2, dp_rank=r) for r in range(2)]
    for step in range(3):
        rows = sum((next(loader).rows for loader in loaders), ())
        assert list(rows) == sampler.batch(step)
    easiest = set(torch.sort(index.difficulties, stable=True).indices[:sampler.pool_size(0)].tolist())
    assert set(loaders[0].global_rows(0)) <= easiest
    assert loaders[0].state_dict()["sampler_seed"] == 9
    small = CurriculumSampler(index, Pacing(), batch_size=4, num_steps=2)
    with pytest.raises(ValueError, match="sampler draws 4 of .* global_batch_size = 8"):
        make(sampler=small)


def test_errors_show_the_arithmetic_and_the_fix(make):
    with pytest.raises(ValueError, match=r"global_batch_size = 6 does not divide over dp = 4: 6 / 4 = 1\.5 "
                                         r"rows per rank; use a multiple of 4, e\.g\. 4 or 8"):
        make(global_batch_size=6, dp_degree=4)
    with pytest.raises(ValueError, match="seq_len = 64 exceeds max_seq_len = 32 .* pass seq_len <= 32"):
        make(seq_len=64, max_seq_len=32)
    with pytest.raises(ValueError, match=r"seq_len = 30 does not divide over cp = 4: 30 / 4 = 7\.5"):
        make(seq_len=30, cp_degree=4)
    with pytest.raises(ValueError, match="dp_rank = 2 is out of range for dp_degree = 2"):
        make(dp_degree=2, dp_rank=2)
    with pytest.raises(ValueError, match="seq_len = 0 is invalid: expected an int >= 1"):
        make(seq_len=0)
    with pytest.raises(ValueError, match=r"windows of seq_len \+ 1 = 8193 tokens, fewer than global_batch"):
        make(seq_len=8192)


def test_a_foreign_or_broken_state_is_refused(make):
    state = make().state_dict()
    with pytest.raises(ValueError, match="has seed = 3 but this loader has 4"):
        make(seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="has stream = .* build the loader with the saved run's corpus"):
        make(fim_rate=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="has global_batch_size = 8 but this loader has 16"):
        make(global_batch_size=16).load_state_dict(state)
    with pytest.raises(ValueError, match="inconsistent: step = 5, epoch = 0, position = 0"):
        make().load_state_dict(state | {"step": 5})
    with pytest.raises(ValueError, match="not a TokenLoader state"):
        make().load_state_dict({"step": 1})

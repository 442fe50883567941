"""Curriculum learning: metrics, the offline index (JSON and weights-only .pt), pacing formulas,
and a sampler that is paced, deterministic, resumable and works with a DataLoader."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from autopar.data import curriculum


def _dataset(n=100):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 64, (n,), generator=g).tolist()
    return [torch.randint(0, 50, (length,), generator=g) for length in lengths]


def test_metrics():
    assert curriculum.sequence_length(torch.tensor([5, 6, 0, 0]), pad_id=0) == 2.0
    assert curriculum.sequence_length({"input_ids": [1, 2, 3]}) == 3.0
    data = [torch.tensor([1, 1, 1, 2]), torch.tensor([1, 1, 1, 1]), torch.tensor([3, 1, 1, 1])]
    counts = curriculum.token_counts(data, vocab_size=4)
    assert counts.tolist() == [0, 10, 1, 1]
    rarity = curriculum.vocabulary_rarity(counts)
    common, rare = rarity(data[1]), rarity(data[0])
    assert rare > common
    p = (counts.double() + 1) / (counts.sum() + 4)
    assert common == pytest.approx(float(-4 * torch.log(p[1])))
    assert curriculum.vocabulary_rarity(counts, reduction="mean")(data[0]) == pytest.approx(rare / 4)


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_index_saves_and_loads(tmp_path, suffix):
    data = _dataset()
    index = curriculum.DifficultyIndex.build(data, "sequence_length")
    assert index.difficulties.tolist() == [float(len(x)) for x in data] and index.metric == "sequence_length"
    path = tmp_path / f"index{suffix}"
    index.save(path)
    loaded = curriculum.DifficultyIndex.load(path)
    assert torch.equal(loaded.difficulties, index.difficulties) and loaded.metric == index.metric
    if suffix == ".pt":
        torch.load(path, weights_only=True)  # a plain dict: no pickled objects
    with pytest.raises(ValueError, match=".json or .pt"):
        index.save(tmp_path / "index.pkl")


def test_pacing_formulas():
    linear = curriculum.Pacing(kind="linear", min_value=64, max_value=1024, num_steps=100, granularity=8)
    for step in (0, 7, 50, 99, 100, 500):
        value = 64 + (1024 - 64) * min(1, step / 100)
        assert linear(step) == min(1024, math.floor(value / 8) * 8)
    root = curriculum.Pacing(kind="root", min_value=10, max_value=100, num_steps=100, root_degree=2,
                             granularity=1)
    assert [root(s) for s in (0, 25, 100)] == [10, 55, 100]  # 10 + 90 × √0.25 = 55
    discrete = curriculum.Pacing(kind="discrete", values=(20, 50, 100), boundaries=(10, 30))
    assert [discrete(s) for s in (0, 10, 11, 30, 31, 999)] == [20, 20, 50, 50, 100, 100]
    custom = curriculum.Pacing(kind="custom", function=lambda step: 100 if step > 3 else 40)
    assert (custom(3), custom(4)) == (40, 100)
    with pytest.raises(ValueError, match="Pacing.kind"):
        curriculum.Pacing(kind="cosine")
    with pytest.raises(ValueError, match="len\\(values\\) = len\\(boundaries\\) \\+ 1"):
        curriculum.Pacing(kind="discrete", values=(1, 2), boundaries=(1, 2))


def test_sampler_paces_easy_samples_first():
    data = _dataset(200)
    index = curriculum.DifficultyIndex.build(data, "sequence_length")
    pacing = curriculum.Pacing(kind="linear", min_value=10, max_value=100, num_steps=20)
    sampler = curriculum.CurriculumSampler(index, pacing, batch_size=8, num_steps=30, seed=1)
    ranks = torch.empty(200, dtype=torch.long)
    ranks[torch.sort(index.difficulties, stable=True).indices] = torch.arange(200)
    for step in (0, 10, 20, 29):
        batch = sampler.batch(step)
        assert len(set(batch)) == 8
        assert max(ranks[batch].tolist()) < sampler.pool_size(step) == math.ceil(200 * pacing(step) / 100)
    assert sampler.pool_size(0) == 20 and sampler.pool_size(25) == 200
    value_pacing = curriculum.Pacing(kind="discrete", values=(10, 100), boundaries=(5,))
    by_value = curriculum.CurriculumSampler(index, value_pacing, batch_size=4, num_steps=10,
                                            difficulty_type="value")
    assert all(index.difficulties[i] <= 10 for i in by_value.batch(0))


def test_sampler_is_deterministic_resumable_and_feeds_a_dataloader():
    data = _dataset(64)
    index = curriculum.DifficultyIndex.build(data, "sequence_length")
    pacing = curriculum.Pacing(kind="root", min_value=25, max_value=100, num_steps=10)

    def sampler(seed=0):
        return curriculum.CurriculumSampler(index, pacing, batch_size=4, num_steps=12, seed=seed)

    full = list(sampler())
    assert len(full) == 48 and full == list(sampler()) and full != list(sampler(seed=1))
    first = sampler()
    it = iter(first)
    head = [next(it) for _ in range(5 * 4)]
    state = first.state_dict()
    assert state == {"step": 5, "seed": 0}
    resumed = sampler()
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    with pytest.raises(ValueError, match="seed"):
        sampler(seed=2).load_state_dict(state)
    padded = [torch.nn.functional.pad(x, (0, 64 - len(x))) for x in data]
    loader = DataLoader(padded, batch_size=4, sampler=sampler())
    batches = list(loader)
    assert len(batches) == 12 and all(b.shape == (4, 64) for b in batches)
    assert torch.equal(batches[0], torch.stack([padded[i] for i in full[:4]]))


def test_truncation_curriculum():
    pacing = curriculum.Pacing(kind="linear", min_value=8, max_value=32, num_steps=4, granularity=8)
    batch = {"input_ids": torch.zeros(2, 32, dtype=torch.long), "labels": torch.zeros(2, 32), "n": 3}
    lengths = [curriculum.truncate_batch(batch, int(pacing(step)))["input_ids"].shape[1] for step in range(6)]
    assert lengths == [8, 8, 16, 26 // 8 * 8, 32, 32]
    assert curriculum.truncate_batch((torch.ones(2, 5), torch.ones(2)), 3)[1].shape == (2,)
    with pytest.raises(ValueError, match="length"):
        curriculum.truncate_batch(batch, 0)

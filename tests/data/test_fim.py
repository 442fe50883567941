"""Fill-in-the-middle: round trip (undoing recovers the document), PSM/SPM layout, rate, determinism."""

import pytest
import torch

from autopar.data import FIMConfig, FIMTransform, undo_fim

TEXT = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("eot", [None, "<EOT>"])
def test_character_level_round_trip_and_layout(eot):
    config = FIMConfig(rate=1.0, spm_rate=0.5, eot=eot, seed=3)
    transform = FIMTransform(config)
    orders = set()
    for index in range(200):
        sample = transform(TEXT, index)
        assert sample.startswith("<PRE>") and sample.count("<SUF>") == sample.count("<MID>") == 1
        assert sample.endswith(eot or "")
        assert len(sample) == len(TEXT) + 15 + len(eot or "")
        assert undo_fim(sample, config) == TEXT
        spm = sample.startswith("<PRE><SUF>")
        orders.add(spm)
        if not spm:  # PSM: <PRE> prefix <SUF> suffix <MID> middle
            prefix, rest = sample[5:].split("<SUF>")
            suffix, middle = rest.split("<MID>")
            assert prefix + middle.removesuffix(eot or "") + suffix == TEXT
    assert orders == {True, False}


def test_spm_puts_suffix_first():
    config = FIMConfig(rate=1.0, spm_rate=1.0)
    sample = FIMTransform(config)(TEXT, 5)
    suffix, prefix_middle = sample.removeprefix("<PRE><SUF>").split("<MID>")
    assert TEXT == prefix_middle + suffix and TEXT.endswith(suffix)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_token_level_round_trip(as_tensor):
    config = FIMConfig(rate=1.0, level="token", prefix=1000, suffix=1001, middle=1002, eot=1003, seed=1)
    transform = FIMTransform(config)
    document = torch.arange(40) if as_tensor else list(range(40))
    for index in range(50):
        sample = transform(document, index)
        assert type(sample) is type(document) and len(sample) == 44
        back = undo_fim(sample, config)
        assert (torch.equal(back, document) if as_tensor else back == document)


def test_rate_and_determinism():
    config = FIMConfig(rate=0.3, seed=11)
    transform = FIMTransform(config)
    samples = [transform(TEXT, i) for i in range(4000)]
    rate = sum(s != TEXT for s in samples) / len(samples)
    assert abs(rate - 0.3) < 0.03  # ~4 standard deviations of a binomial(4000, 0.3)
    assert samples == [FIMTransform(config)(TEXT, i) for i in range(4000)]
    assert samples != [FIMTransform(FIMConfig(rate=0.3, seed=12))(TEXT, i) for i in range(4000)]
    assert all(FIMTransform(FIMConfig(rate=0.0))(TEXT, i) == TEXT for i in range(100))
    assert undo_fim(TEXT, config) == TEXT


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rate": 1.5}, "FIMConfig.rate"),
    ({"level": "word"}, "FIMConfig.level"),
    ({"level": "token"}, "FIMConfig.prefix.*token id"),
    ({"prefix": "<X>", "suffix": "<X>"}, "must differ"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FIMConfig(**kwargs)
    with pytest.raises(TypeError, match="level=.token."):
        FIMTransform(FIMConfig(rate=1.0))([1, 2, 3], 0)

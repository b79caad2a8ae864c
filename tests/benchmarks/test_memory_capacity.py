"""The capacity benchmark's search and model family (the capped runs themselves are the benchmark)."""

import pytest
import torch

from apps.gpt.config import GPTModelConfig
from apps.gpt.model import GPT
from benchmarks.memory_capacity import estimate, family, largest, params_of


@pytest.mark.parametrize("k", [1, 3, 14, 49])
def test_params_of_counts_the_family_model(k):
    with torch.device("meta"):
        model = GPT(GPTModelConfig(**family(k)))
    assert params_of(k) == model.num_params()


@pytest.mark.parametrize("answer", [0, 1, 2, 7, 13, 14, 15, 40, 96])
@pytest.mark.parametrize("start", [1, 9, 14, 50, 96])
def test_largest_finds_the_boundary_from_any_start(answer, start):
    tried = []

    def fits(k):
        tried.append(k)
        return k <= answer

    assert largest(fits, start, 96) == answer
    assert len(tried) == len(set(tried))          # never the same size twice
    assert len(tried) <= 16


def test_a_good_estimate_costs_two_trials():
    start = estimate(16, 2.65 * 2**30, 96)          # 3 GiB cap minus 0.35 GiB of runtime
    assert start == 15
    tried = []
    assert largest(lambda k: tried.append(k) or k <= 14, start, 96) == 14   # as measured: 15 is over the cap
    assert tried == [15, 14]

"""Tensor-parallel layouts that do not fit are refused with the valid sizes; dropout draws per rank
only where activations are split. (Every layer of every mode against serial runs with the GPT
checks, in the same ranks: tests.core.tensor.test_gpt_tensor_parallel.py and layer_chain.py here.)"""

import re

import pytest
import torch

from core.distributed import Layout, ParallelMesh
from core.distributed.testing import run_distributed
from core.errors import LoomError
from core.tensor import make_mode


class _SizesOnly:
    """A mesh as far as the layout check looks: it refuses before creating any group."""

    def __init__(self, tp):
        self.tp = tp

    def size(self, axis):
        return self.tp if axis == "tp" else 1


@pytest.mark.parametrize("name,tp,depth,says", [
    ("2d", 2, 1, "needs a square parallel.tp (q x q); tp=2 is not one. Valid sizes: 4, 9, 16"),
    ("3d", 4, 1, "needs a cube parallel.tp (q x q x q); tp=4 is not one. Valid sizes: 8, 27, 64"),
    ("2.5d", 4, 2, "tp = q x q x d with d = parallel.tp_depth=2; tp=4 is not one. Valid sizes with d=2: 8 (q=2, d=2)"),
])
def test_layouts_that_do_not_fit_name_the_valid_sizes(name, tp, depth, says):
    with pytest.raises(LoomError, match=re.escape(says)):
        make_mode(name, _SizesOnly(tp), depth)


def _dropout_masks():
    from core.tensor import Dropout

    mesh = ParallelMesh.build(Layout(tp=4))
    one_d, two_d = make_mode("1d", mesh), make_mode("2d", mesh)
    torch.manual_seed(0)                                   # the same default stream on every rank
    x = torch.ones(64)
    masks = {"1d replicated": Dropout(0.5, one_d)(x), "1d split": Dropout(0.5, one_d, split=True)(x),
             "2d": Dropout(0.5, two_d)(x)}
    return {k: v.ne(0) for k, v in masks.items()}, torch.rand(4)


def test_dropout_draws_per_rank_only_where_activations_are_split():
    results = run_distributed(_dropout_masks, world_size=4)
    first, after = results[0]
    for masks, next_draw in results[1:]:
        assert torch.equal(masks["1d replicated"], first["1d replicated"])    # replicas stay equal
        assert not torch.equal(masks["1d split"], first["1d split"])          # its own heads, its own mask
        assert not torch.equal(masks["2d"], first["2d"])
        assert torch.equal(next_draw, after)      # the default stream advanced alike on every rank

"""Every tensor-parallel mode against the serial computation on gloo ranks: 1D on 2 and 4, 2D on 4
(2 x 2), 2.5D on 8 (2 x 2 x 2), 3D on 8 (2 x 2 x 2). A chain of every layer (vocabulary
embedding, position embedding, LayerNorm, a column Linear, a row Linear, the
classifier, the vocabulary-parallel cross-entropy): outputs, input and weight gradients, weights
after 3 AdamW steps, shard equality, and the cross-entropy's exact communication."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.distributed import Layout, ParallelMesh
from core.distributed.testing import run_distributed
from core.errors import LoomError
from core.tensor import (COLUMN, ROW, Embedding, LayerNorm, Linear, PositionEmbedding, cross_entropy,
                         grad_norm_sq, make_mode)

B, T, D, H, V = 4, 3, 16, 32, 64     # batch, time, width, hidden, vocabulary
TOKEN_PARTS = {"1d": 1, "2d": 2, "2.5d": 4, "3d": 4}     # how each layout above splits the tokens
LAYOUTS = [("1d", 2, 1), ("1d", 4, 1), ("2d", 4, 1), ("2.5d", 8, 2), ("3d", 8, 1)]


def _serial_modules():
    torch.manual_seed(0)
    mods = {"emb": nn.Embedding(V, D), "wpe": nn.Embedding(T, D), "ln": nn.LayerNorm(D),
            "fc": nn.Linear(D, H), "proj": nn.Linear(H, D), "head": nn.Linear(D, V, bias=False)}
    with torch.no_grad():   # LayerNorm away from its identity initialisation
        mods["ln"].weight.uniform_(0.5, 1.5)
        mods["ln"].bias.uniform_(-0.5, 0.5)
    return mods


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def _forward(m, ids, x=None):
    """The chain; `x` replaces the embeddings' output (to take its gradient)."""
    if x is None:
        x = m["emb"](ids) + m["wpe"](torch.arange(T))
    h = x + m["proj"](F.gelu(m["fc"](m["ln"](x))))
    return x, h, m["head"](h)


def _serial_run(steps=3):
    m = _serial_modules()
    ids, target = _data()
    params = [p for mod in m.values() for p in mod.parameters()]
    opt = torch.optim.AdamW(params, lr=0.01)
    out = {}
    for step in range(steps):
        x = None
        if step == 0:
            x = (m["emb"](ids) + m["wpe"](torch.arange(T))).detach().requires_grad_(True)
        x, h, logits = _forward(m, ids, x)
        loss = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1))
        loss.backward()
        if step == 0:
            out.update(x=x.detach().clone(), h=h.detach(), loss=loss.item(), x_grad=x.grad.clone(),
                       grads={f"{k}.{n}": p.grad.clone() for k in ("ln", "fc", "proj", "head")
                              for n, p in m[k].named_parameters()},
                       norm=float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in params if p.grad is not None))))
            m["emb"].weight.grad = m["wpe"].weight.grad = None
        opt.step()
        opt.zero_grad()
    out["weights"] = {f"{k}.{n}": p.detach() for k, mod in m.items() for n, p in mod.named_parameters()}
    return out


def _expected_shard(name, w, rank, q, p, role):
    """A Linear's (out, in) weight as each mode's design places it, written out."""
    if name == "1d":
        return w.chunk(p, 0)[rank] if role == COLUMN else w.chunk(p, 1)[rank]
    if name in ("2d", "2.5d"):
        i, j = rank // q % q, rank % q
        return w.chunk(q, 0)[i].chunk(q, 1)[j]
    a, b, c = rank // (q * q), rank // q % q, rank % q
    out_part, in_part = (c, b) if role == COLUMN else (b, c)
    return w.chunk(q, 0)[out_part].chunk(q, 0)[a].chunk(q, 1)[in_part]


def _tp_run(name, tp, depth, steps=3):
    mesh = ParallelMesh.build(Layout(tp=tp))
    mode = make_mode(name, mesh, depth)
    s = _serial_modules()
    m = {"emb": Embedding(V, D, mode), "wpe": PositionEmbedding(T, D, mode), "ln": LayerNorm(D, mode),
         "fc": Linear(D, H, mode, role=COLUMN), "proj": Linear(H, D, mode, role=ROW),
         "head": Linear(D, V, mode, bias=False, role=COLUMN)}
    for k, mod in m.items():
        mod.load_serial(**{n: p.data for n, p in s[k].named_parameters()})
    q = getattr(mode, "q", tp)
    out = {"shard_ok": all(torch.equal(m[k].weight, _expected_shard(name, s[k].weight.data, mode.rank, q, tp, role))
                           for k, role in (("fc", COLUMN), ("proj", ROW), ("head", COLUMN)))}
    ids, target = _data()
    params = [p for mod in m.values() for p in mod.parameters()]
    opt = torch.optim.AdamW(params, lr=0.01)
    for step in range(steps):
        x = None
        if step == 0:
            x_local = m["emb"](ids) + m["wpe"](torch.arange(T))
            x_full = mode.gather_activation(x_local).requires_grad_(True)
            x = mode.split_input(x_full)
        x, h, logits = _forward(m, ids, x)
        mesh.stats.reset()
        loss = cross_entropy(logits, target, mode)
        ce_comm = mesh.stats.as_dict()
        loss.backward()
        if step == 0:
            out.update(x=x_full.detach(), h=mode.gather_activation(h.detach()), loss=loss.item(),
                       x_grad=x_full.grad, ce_comm=ce_comm,
                       logits=mode.gather_activation(logits.detach(), COLUMN),
                       grads={f"{k}.{n}": m[k].mode.gather(m[k].tp_kinds[n], p.grad, m[k].serial_shapes[n])
                              for k in ("ln", "fc", "proj", "head") for n, p in m[k].named_parameters()},
                       norm=float(grad_norm_sq([p for p in params if p.grad is not None], mode.axis).sqrt()))
            m["emb"].weight.grad = m["wpe"].weight.grad = None
        opt.step()
        opt.zero_grad()
    out["weights"] = {f"{k}.{n}": v for k, mod in m.items() for n, v in mod.serial_state().items()}
    return out


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("name,tp,depth", LAYOUTS, ids=[f"{n}-tp{t}" for n, t, _ in LAYOUTS])
def test_mode_matches_serial(name, tp, depth):
    ref = _serial_run()
    serial_logits = _forward(_serial_modules(), _data()[0])[2]
    vocab_axis = {"1d": "tp", "2d": "tp.row", "2.5d": "tp.row", "3d": "tp.c"}[name]
    token_axis = {"2d": "tp.rep", "2.5d": "tp.rep", "3d": "tp.ab"}.get(name)
    for got in run_distributed(_tp_run, world_size=tp, args=(name, tp, depth)):
        assert got["shard_ok"]
        assert _rel(got["x"], ref["x"]) <= 1e-6
        assert _rel(got["h"], ref["h"]) <= 1e-5
        assert _rel(got["logits"], serial_logits.detach()) <= 1e-5
        assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])    # vocab-parallel CE = torch's
        assert _rel(got["x_grad"], ref["x_grad"]) <= 1e-5
        for key, g in ref["grads"].items():
            assert _rel(got["grads"][key], g) <= 1e-5, key
        assert got["norm"] == pytest.approx(ref["norm"], rel=1e-5)            # each part counted once
        for key, w in ref["weights"].items():
            assert _rel(got["weights"][key], w) <= 1e-5, key
        # the cross-entropy: three all-reduces of one number per token over the vocabulary's ranks,
        # and (where tokens are split) one of the loss value over the ranks holding the others
        expected = {vocab_axis: {"all_reduce": {"calls": 3, "bytes": 3 * 4 * B * T // TOKEN_PARTS[name]}}}
        if token_axis:
            expected[token_axis] = {"all_reduce": {"calls": 1, "bytes": 4}}
        assert got["ce_comm"] == expected


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

"""A chain of every tensor-parallel layer (vocabulary embedding, position embedding, LayerNorm, a
column Linear, a row Linear, the classifier, the vocabulary-parallel cross-entropy) against its
torch.nn counterpart: outputs, input and weight gradients, the clipping norm, weights after 3
AdamW steps, shard equality against slices written out per mode, and the cross-entropy's exact
communication. `chain_run` runs on every rank of a layout; `check_chain` asserts on the results
(tests.core.tensor.test_gpt_tensor_parallel.py runs it in the same ranks as the GPT checks)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.distributed import Layout, ParallelMesh
from core.tensor import (COLUMN, ROW, Embedding, LayerNorm, Linear, PositionEmbedding, cross_entropy,
                         make_mode)
from core.optim.norms import global_norm, gradients

B, T, D, H, V = 4, 3, 16, 32, 64     # batch, time, width, hidden, vocabulary
TOKEN_PARTS = {"1d": 1, "2d": 2, "2.5d": 4, "3d": 4}     # how each tested layout splits the tokens (q = 2)


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


def serial_chain(steps=3):
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


def chain_run(name, tp, depth, steps=3):
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
                       norm=float(global_norm(gradients(params, mode.axis), (mode.axis,))))
            m["emb"].weight.grad = m["wpe"].weight.grad = None
        opt.step()
        opt.zero_grad()
    out["weights"] = {f"{k}.{n}": v for k, mod in m.items() for n, v in mod.serial_state().items()}
    return out


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def check_chain(name, tp, results):
    """The assertions on every rank's `chain_run` result."""
    ref = serial_chain()
    serial_logits = _forward(_serial_modules(), _data()[0])[2]
    vocab_axis = {"1d": "tp", "2d": "tp.row", "2.5d": "tp.row", "3d": "tp.c"}[name]
    token_axis = {"2d": "tp.rep", "2.5d": "tp.rep", "3d": "tp.ab"}.get(name)
    for got in results:
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

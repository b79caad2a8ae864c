"""1D tensor parallelism against the serial computation on 2 and 4 gloo ranks: a column/row
Linear pair, the vocabulary-parallel embedding and cross-entropy; outputs, input and weight
gradients, weights after 3 AdamW steps, shard equality, and the exact communication."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.distributed import Layout, ParallelMesh
from core.distributed.testing import run_distributed
from core.tensor import COLUMN, ROW, Embedding, Linear, cross_entropy, make_mode

D, H, V, N = 16, 32, 64, 12      # width, hidden, vocabulary, tokens


def _serial():
    torch.manual_seed(0)
    emb, fc, proj, head = nn.Embedding(V, D), nn.Linear(D, H), nn.Linear(H, D), nn.Linear(D, V, bias=False)
    return emb, fc, proj, head


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (N,), generator=g), torch.randint(0, V, (N,), generator=g)


def _serial_run(steps=3):
    emb, fc, proj, head = _serial()
    ids, target = _data()
    params = [p for m in (emb, fc, proj, head) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=0.01)
    out = {}
    for step in range(steps):
        x = emb(ids).detach().requires_grad_(True) if step == 0 else emb(ids)
        h = proj(F.gelu(fc(x)))
        loss = F.cross_entropy(head(h), target)
        loss.backward()
        if step == 0:
            out.update(h=h.detach(), loss=loss.item(), x_grad=x.grad.clone(),
                       grads={n: p.grad.clone() for n, p in (("fc.w", fc.weight), ("fc.b", fc.bias),
                                                              ("proj.w", proj.weight), ("head.w", head.weight))})
            emb.weight.grad = None     # step 0 fed a detached copy
        opt.step()
        opt.zero_grad()
    out["weights"] = {"emb": emb.weight.detach(), "fc.w": fc.weight.detach(), "proj.w": proj.weight.detach(),
                      "head.w": head.weight.detach()}
    return out


def _tp_run(tp, steps=3):
    mesh = ParallelMesh.build(Layout(tp=tp))
    mode = make_mode("1d", mesh)
    s_emb, s_fc, s_proj, s_head = _serial()
    emb, fc = Embedding(V, D, mode), Linear(D, H, mode, role=COLUMN)
    proj, head = Linear(H, D, mode, role=ROW), Linear(D, V, mode, bias=False, role=COLUMN)
    emb.load_serial(s_emb.weight.data)
    fc.load_serial(s_fc.weight.data, s_fc.bias.data)
    proj.load_serial(s_proj.weight.data, s_proj.bias.data)
    head.load_serial(s_head.weight.data)
    shards_equal = (torch.equal(fc.weight, s_fc.weight.data.chunk(tp, 0)[mode.rank])
                    and torch.equal(proj.weight, s_proj.weight.data.chunk(tp, 1)[mode.rank])
                    and torch.equal(emb.weight, s_emb.weight.data.chunk(tp, 0)[mode.rank]))
    ids, target = _data()
    params = [p for m in (emb, fc, proj, head) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=0.01)
    out = {"shards_equal": shards_equal}
    for step in range(steps):
        x = emb(ids).detach().requires_grad_(True) if step == 0 else emb(ids)
        h = proj(F.gelu(fc(x)))
        logits = head(h)
        mesh.stats.reset()
        loss = cross_entropy(logits, target, mode)
        ce_calls = mesh.stats.calls("tp")
        loss.backward()
        if step == 0:
            out.update(h=h.detach(), loss=loss.item(), x_grad=x.grad.clone(), ce_calls=ce_calls,
                       grads={"fc.w": fc.weight.grad.clone(), "fc.b": fc.bias.grad.clone(),
                              "proj.w": proj.weight.grad.clone(), "head.w": head.weight.grad.clone()})
            emb.weight.grad = None
        opt.step()
        opt.zero_grad()
    out["weights"] = {"emb": emb.serial_state(), "fc.w": fc.serial_state()[0], "proj.w": proj.serial_state()[0],
                      "head.w": head.serial_state()[0]}
    # one pair's communication, forward and backward: exactly one all-reduce each way
    mesh.stats.reset()
    x = torch.randn(N, D, requires_grad=True)
    proj(F.gelu(fc(x))).sum().backward()
    out["pair_all_reduces"] = mesh.stats.calls("tp", "all_reduce")
    out["pair_bytes"] = mesh.stats.bytes("tp", "all_reduce")
    return out


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("tp", [2, 4])
def test_one_d_matches_serial(tp):
    ref = _serial_run()
    for rank, got in enumerate(run_distributed(_tp_run, world_size=tp, args=(tp,))):
        assert got["shards_equal"]
        assert _rel(got["h"], ref["h"]) <= 1e-5
        assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])     # vocab-parallel CE = torch's
        assert _rel(got["x_grad"], ref["x_grad"]) <= 1e-5
        column = {"fc.w": 0, "fc.b": 0, "head.w": 0}
        for name, g in got["grads"].items():
            want = ref["grads"][name].chunk(tp, column.get(name, 1))[rank] if name != "proj.b" else ref["grads"][name]
            assert _rel(g, want) <= 1e-5, name
        for name, w in ref["weights"].items():
            assert _rel(got["weights"][name], w) <= 1e-5, name
        assert got["ce_calls"] == 3          # max, sum of exponentials, target logit
        assert got["pair_all_reduces"] == 2  # one forward (row output), one backward (column input)
        assert got["pair_bytes"] == 2 * N * D * 4


def _layer_comm(tp, batch, seq, heads):
    """A transformer layer's two pairs (qkv/proj with whole heads per rank, fc/proj) on tp ranks:
    the counted bytes, and the qkv shards' agreement with the serial weight's heads."""
    mesh = ParallelMesh.build(Layout(tp=tp))
    mode = make_mode("1d", mesh)
    torch.manual_seed(0)
    serial_qkv = nn.Linear(D, 3 * D)
    qkv = Linear(D, 3 * D, mode, role=COLUMN, groups=3)
    qkv.load_serial(serial_qkv.weight.data, serial_qkv.bias.data)
    w_q, w_k, w_v = serial_qkv.weight.data.chunk(3, 0)
    mine = torch.cat([w.chunk(tp, 0)[mode.rank] for w in (w_q, w_k, w_v)], 0)
    heads_ok = torch.equal(qkv.weight.data, mine) and torch.equal(qkv.serial_state()[0], serial_qkv.weight.data)
    proj, fc, fc2 = Linear(D, D, mode, role=ROW), Linear(D, H, mode, role=COLUMN), Linear(H, D, mode, role=ROW)
    x = torch.randn(batch, seq, D, requires_grad=True)
    mesh.stats.reset()
    q, k, v = qkv(x).chunk(3, dim=-1)                    # this rank's heads of each
    hd = D // heads
    q, k, v = (t.reshape(batch, seq, -1, hd).transpose(1, 2) for t in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, -1)
    h = x + proj(a)
    y = h + fc2(F.gelu(fc(h)))
    y.square().mean().backward()
    return heads_ok, mesh.stats.calls("tp"), mesh.stats.bytes("tp")


@pytest.mark.parametrize("tp", [2, 4])
def test_cost_model_predicts_a_layers_communication(tp):
    from core.tensor.cost import transformer_layer

    batch, seq, heads = 2, 8, 4
    predicted = transformer_layer("1d", tp, batch, seq, D)
    for heads_ok, calls, nbytes in run_distributed(_layer_comm, world_size=tp, args=(tp, batch, seq, heads)):
        assert heads_ok
        assert calls == predicted.calls and nbytes == predicted.payload_bytes
    assert predicted.wire_bytes == pytest.approx(predicted.payload_bytes * 2 * (tp - 1) / tp)

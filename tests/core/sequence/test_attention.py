"""Ring and all-to-all attention on 2 and 4 gloo ranks against full attention on one process:
outputs and the gradients of queries, keys and values (causal and not; fp32, 1e-5), and the ring
sends exactly p - 1 key/value blocks per rank in forward."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from core.distributed import Layout, ParallelMesh
from core.distributed.testing import run_distributed
from core.sequence import all_to_all_attention, ring_attention

B, H, L, D = 2, 4, 16, 8


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(B, H, L, D, generator=g) for _ in range(4))
    return q, k, v, grad


def _full(causal):
    q, k, v, grad = _inputs()
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _split(p):
    mesh = ParallelMesh.build(Layout(sp=p))
    axis = mesh.axis("sp")
    out = {}
    for (name, fn), causal in itertools.product((("ring", ring_attention), ("all_to_all", all_to_all_attention)),
                                                (True, False)):
        q, k, v, grad = (t.chunk(p, dim=2)[axis.rank].clone() for t in _inputs())
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        mesh.stats.reset()
        y = fn(q, k, v, axis, causal)
        sends = mesh.stats.calls("sp", "send")
        block_bytes = mesh.stats.bytes("sp", "send")
        y.backward(grad)
        out[(name, causal)] = (y.detach(), q.grad, k.grad, v.grad, sends, block_bytes)
    return out


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("p", [2, 4])
def test_split_attention_matches_full_attention(p):
    refs = {causal: _full(causal) for causal in (True, False)}
    for rank, got in enumerate(run_distributed(_split, world_size=p, args=(p,))):
        for (name, causal), (y, dq, dk, dv, sends, nbytes) in got.items():
            want = [t.chunk(p, dim=2)[rank] for t in refs[causal]]
            for label, a, b in zip(("out", "dq", "dk", "dv"), (y, dq, dk, dv), want):
                assert _rel(a, b) <= 1e-5, (name, causal, label)
            if name == "ring":
                assert sends == p - 1                       # one key/value block per step
                assert nbytes == (p - 1) * 2 * B * H * (L // p) * D * 4


def test_blockwise_attention_on_one_rank_is_torch_attention():
    """The benchmark's sp = 1 baseline: the ring algorithm with one L x L block."""
    from core.distributed.comm import AxisGroup

    for causal in (True, False):
        ref = _full(causal)
        q, k, v, grad = (t.clone().requires_grad_(i < 3) for i, t in enumerate(_inputs()))
        y = ring_attention(q, k, v, AxisGroup("sp", 1, 0, (0,)), causal, blockwise_on_one_rank=True)
        y.backward(grad)
        for a, b in zip((y.detach(), q.grad, k.grad, v.grad), ref):
            assert _rel(a, b) <= 1e-5

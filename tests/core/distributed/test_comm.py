"""Counted collectives: values, gradients (the adjoint of each op) and the accounting."""

import pytest
import torch

from core.distributed import Layout, ParallelMesh
from core.distributed import comm
from core.distributed.testing import run_distributed


def _collectives_on_4_ranks():
    mesh = ParallelMesh.build(Layout(dp=4))
    dp = mesh.axis("dp")
    r = dp.rank
    out = {}

    # all_reduce of N floats: value, gradient, and exactly one call of 4N bytes counted.
    n = 1000
    x = torch.full((n,), float(r + 1), requires_grad=True)
    y = comm.all_reduce(x, dp)
    (y * (r + 1)).sum().backward()  # d/dx_r of sum_i (i+1) * sum_j x_j = sum_i (i+1) = 10
    out["all_reduce"] = (y[0].item(), x.grad[0].item(), mesh.stats.calls("dp", "all_reduce"),
                         mesh.stats.bytes("dp", "all_reduce"))
    mesh.stats.reset()

    # avg
    a = torch.tensor([float(r)], requires_grad=True)
    comm.all_reduce(a, dp, op="avg").sum().backward()
    out["avg"] = (comm.all_reduce(torch.tensor([float(r)]), dp, op="avg").item(), a.grad.item())
    mesh.stats.reset()

    # all_gather along dim 1; backward is a reduce_scatter of the upstream gradient
    g_in = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * r
    g_in.requires_grad_(True)
    gathered = comm.all_gather(g_in, dp, dim=1)
    weight = torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape) * (r + 1)
    (gathered * weight).sum().backward()
    out["all_gather"] = (gathered.detach().clone(), g_in.grad.clone(), mesh.stats.as_dict())
    mesh.stats.reset()

    # reduce_scatter along dim 0; backward is an all_gather
    rs_in = (torch.arange(8, dtype=torch.float32) * (r + 1)).requires_grad_(True)
    rs = comm.reduce_scatter(rs_in, dp, dim=0)
    (rs * (r + 1)).sum().backward()
    out["reduce_scatter"] = (rs.detach().clone(), rs_in.grad.clone())

    # all_to_all: scatter dim 0, gather dim 1; backward is the inverse all_to_all
    t_in = (torch.arange(8, dtype=torch.float32).reshape(4, 2) + 100 * r).requires_grad_(True)
    t = comm.all_to_all(t_in, dp, scatter_dim=0, gather_dim=1)
    (t * (r + 1)).sum().backward()
    out["all_to_all"] = (t.detach().clone(), t_in.grad.clone())

    # broadcast from axis rank 2; the gradient flows back to the source only
    b_in = torch.tensor([float(r)], requires_grad=True)
    b = comm.broadcast(b_in, dp, src=2)
    (b * (r + 1)).sum().backward()
    out["broadcast"] = (b.item(), b_in.grad.item())

    # point to point around a ring
    mesh.stats.reset()
    buf = torch.empty(5)
    if r % 2 == 0:
        comm.send(torch.full((5,), float(r)), dp, dst=(r + 1) % 4)
        comm.recv(buf, dp, src=(r - 1) % 4)
    else:
        comm.recv(buf, dp, src=(r - 1) % 4)
        comm.send(torch.full((5,), float(r)), dp, dst=(r + 1) % 4)
    out["p2p"] = (buf[0].item(), mesh.stats.as_dict())
    return out


def test_collectives_values_gradients_and_counts():
    results = run_distributed(_collectives_on_4_ranks, world_size=4)
    for r, out in enumerate(results):
        y, grad, calls, nbytes = out["all_reduce"]
        assert y == 1 + 2 + 3 + 4
        assert grad == 1 + 2 + 3 + 4
        # forward all_reduce + its backward all_reduce, each N fp32 values
        assert calls == 2 and nbytes == 2 * 1000 * 4

        value, grad = out["avg"]
        assert value == pytest.approx(1.5) and grad == pytest.approx((1 + 1 + 1 + 1) / 4)

        gathered, grad, counted = out["all_gather"]
        expected = torch.cat([torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * k
                              for k in range(4)], dim=1)
        assert torch.equal(gathered, expected)
        w = torch.arange(24, dtype=torch.float32).reshape(2, 12)
        # d/d(shard r) of sum_k (k+1) <w, gathered> is sum_k (k+1) * w[:, 3r:3r+3]
        assert torch.equal(grad, 10 * w[:, 3 * r:3 * r + 3])
        assert counted == {"dp": {"all_gather": {"calls": 1, "bytes": 6 * 4},
                                  "reduce_scatter": {"calls": 1, "bytes": 24 * 4}}}

        rs, grad = out["reduce_scatter"]
        assert torch.equal(rs, torch.arange(8, dtype=torch.float32)[2 * r:2 * r + 2] * 10)
        assert torch.equal(grad, torch.tensor([1., 1, 2, 2, 3, 3, 4, 4]))

        t, grad = out["all_to_all"]
        expected = torch.cat([(torch.arange(8, dtype=torch.float32).reshape(4, 2) + 100 * k)[r:r + 1]
                              for k in range(4)], dim=1)
        assert torch.equal(t, expected)
        assert torch.equal(grad, torch.tensor([1., 2, 3, 4]).repeat_interleave(2).reshape(4, 2))

        b, grad = out["broadcast"]
        assert b == 2.0
        assert grad == (10.0 if r == 2 else 0.0)

        received, counted = out["p2p"]
        assert received == float((r - 1) % 4)
        assert counted == {"dp": {"recv": {"calls": 1, "bytes": 20}, "send": {"calls": 1, "bytes": 20}}}


def _per_axis_counts():
    mesh = ParallelMesh.build(Layout(dp=2, tp=2))
    x = torch.ones(16)
    comm.all_reduce(x, mesh.axis("tp"))
    comm.all_reduce(x, mesh.axis("tp"))
    comm.all_gather(x, mesh.axis("dp"))
    total = comm.all_reduce(torch.tensor([float(mesh.global_rank)]), mesh.axis("dp")).item()
    return (mesh.stats.as_dict(), mesh.axis("tp").ranks, mesh.axis("dp").ranks, total)


def test_counts_are_kept_per_axis_and_axes_group_the_right_ranks():
    results = run_distributed(_per_axis_counts, world_size=4)
    for rank, (counts, tp_ranks, dp_ranks, total) in enumerate(results):
        assert counts == {"tp": {"all_reduce": {"calls": 2, "bytes": 128}},
                          "dp": {"all_gather": {"calls": 1, "bytes": 64},
                                 "all_reduce": {"calls": 1, "bytes": 4}}}
        # tp is innermost: tp neighbours are consecutive ranks; dp strides over them
        assert tp_ranks == (rank - rank % 2, rank - rank % 2 + 1)
        assert dp_ranks == (rank % 2, rank % 2 + 2)
        assert total == sum(dp_ranks)


def test_single_process_axes_communicate_nothing():
    mesh = ParallelMesh.build(Layout())
    x = torch.randn(4, requires_grad=True)
    for fn in (comm.all_reduce, comm.all_gather, comm.reduce_scatter, comm.broadcast):
        assert fn(x, mesh.axis("dp")) is x
    assert comm.all_to_all(x, mesh.axis("sp"), 0, 0) is x
    assert mesh.stats.calls() == 0

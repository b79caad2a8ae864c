"""GPT under sequence parallelism against the serial model: sp=2 and sp=4 with ring and all-to-all
attention, sp=2 x tp=2 and dp=2 x sp=2 on 4 ranks; the loss of each of 3 steps, the first step's
gradients (1e-6) and the weights after 3 steps of SGD with momentum (1e-5; see `_optimizer`), fp32.
Layouts that cannot split refuse at start."""

import pytest
import torch

from apps.gpt.config import GPTModelConfig
from apps.gpt.model import GPT
from core.booster import DDPPlugin
from core.distributed import Layout, ParallelMesh
from core.distributed.comm import AxisGroup
from core.distributed.testing import run_distributed
from core.errors import LoomError
from core.sequence import SequenceParallel
from core.tensor import make_mode

CFG = GPTModelConfig(n_layer=2, n_head=4, d_model=32, seq_len=16, vocab_size=64, bias=False)
STEPS, PER_RANK = 3, 4                     # steps; sequences per data-parallel rank


def _batch(step, dp):
    g = torch.Generator().manual_seed(10 + step)
    return torch.randint(0, CFG.vocab_size, (dp * PER_RANK, CFG.seq_len + 1), generator=g)


def _optimizer(model):
    # SGD with momentum and weight decay: Adam divides each element by its own gradient scale, which
    # turns the summation-order noise of near-cancelling elements (relative 1e-3 on a handful of
    # elements when the gradient as a whole agrees to 2e-7) into 3e-5 .. 7e-5 weight differences
    # under dp x sp; the parity of the computation is what this test is about
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)


def _serial(dp):
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = _optimizer(model)
    losses = []
    for step in range(STEPS):
        total = 0.0
        for part in _batch(step, dp).split(PER_RANK):   # what each data-parallel rank sees, accumulated
            loss = model.loss(model(part[:, :-1]), part[:, 1:]) / dp
            loss.backward()
            total += loss.item()
        losses.append(total)
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return losses, model.state_dict(), first_grads


def _split(layout):
    mesh = ParallelMesh.build(layout)
    mode = make_mode("1d", mesh) if layout.tp > 1 else None
    dp = mesh.axis("dp")
    out = {}
    for sp_mode in ("ring", "all_to_all"):
        torch.manual_seed(0)
        model = GPT(CFG, mode, SequenceParallel(mesh.axis("sp"), sp_mode))
        plugin = DDPPlugin(mesh)
        opt = _optimizer(model)
        wrapped, wopt = plugin.configure(model, opt)
        losses = []
        for step in range(STEPS):
            batch = _batch(step, dp.size)[dp.rank * PER_RANK:(dp.rank + 1) * PER_RANK]
            loss = model.loss(wrapped(batch[:, :-1]), batch[:, 1:])
            wopt.backward(loss)
            losses.append(loss.item())
            if step == 0:
                grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            wopt.step()
            wopt.zero_grad()
        out[sp_mode] = (losses, model.serial_state_dict(), grads)
    return out


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


LAYOUTS = [Layout(sp=2), Layout(sp=4), Layout(sp=2, tp=2), Layout(dp=2, sp=2)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe().replace(" ", "_"))
def test_gpt_sequence_parallel_matches_serial(layout):
    ref_losses, ref_weights, ref_grads = _serial(layout.dp)
    for got in run_distributed(_split, world_size=layout.world_size, args=(layout,)):
        for sp_mode, (losses, weights, grads) in got.items():
            if layout.dp > 1:      # each dp rank reports its own sequences' mean
                assert len(losses) == STEPS
            else:
                assert losses == pytest.approx(ref_losses, rel=1e-5), sp_mode
            if layout.tp == 1:
                for name, g in ref_grads.items():
                    assert _rel(grads[name], g) <= 1e-6, (sp_mode, name)
            for name, w in ref_weights.items():
                assert _rel(weights[name], w) <= 1e-5, (sp_mode, name)


def test_what_cannot_split_is_refused_at_start():
    axis = AxisGroup("sp", 4, 0, (0, 1, 2, 3))      # the checks come before any communication
    said = []
    for cfg, sp_mode in ((GPTModelConfig(n_layer=1, n_head=4, d_model=32, seq_len=18, vocab_size=64), "ring"),
                         (GPTModelConfig(n_layer=1, n_head=6, d_model=48, seq_len=16, vocab_size=64), "all_to_all"),
                         (GPTModelConfig(n_layer=1, n_head=4, d_model=32, seq_len=16, vocab_size=64, dropout=0.1),
                          "ring")):
        try:
            GPT(cfg, None, SequenceParallel(axis, sp_mode))
            said.append(None)
        except LoomError as e:
            said.append(str(e))
    assert said[0] == "model.seq_len=18 does not split into parallel.sp=4 equal parts; use a multiple of 4"
    assert said[1].startswith("parallel.sp_mode=all_to_all needs the attention heads on each rank (6) to divide "
                              "by parallel.sp=4")
    assert said[2].startswith("model.dropout=0.1 with parallel.sp=4")

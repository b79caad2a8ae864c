"""GPT under pipeline parallelism against the serial model with the same global batch: pp=2 and
pp=4 with each schedule (GPipe, 1F1B, interleaved with 2 virtual stages), and dp=2 x pp=2 x tp=2
on 8 ranks: the loss of every step, the clipped gradient norm, and the weights after 3 AdamW
steps, fp32, 1e-5; the checkpoint a pipelined run writes is the serial state dict."""

import pytest
import torch
from safetensors.torch import load_file

from apps.gpt.config import GPTModelConfig
from apps.gpt.model import GPT
from core.booster import HybridPlugin
from core.distributed import Layout, ParallelMesh
from core.distributed.testing import run_distributed
from core.tensor import make_mode

CFG = GPTModelConfig(n_layer=8, n_head=2, d_model=16, seq_len=8, vocab_size=32, bias=True)
STEPS, MICRO, MB = 3, 4, 2          # steps; micro-batches per dp rank; samples per micro-batch


def _global_batch(step, dp):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, CFG.vocab_size, (dp * MICRO * MB, CFG.seq_len + 1), generator=g)


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)


def _serial(dp):
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = _optimizer(model)
    losses, norms = [], []
    for step in range(STEPS):
        total = 0.0
        for mb in _global_batch(step, dp).split(MB):        # dp x MICRO micro-batches, accumulated
            loss = model.loss(model(mb[:, :-1]), mb[:, 1:]) / (dp * MICRO)
            loss.backward()
            total += loss.item()
        losses.append(total)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
        opt.step()
        opt.zero_grad()
    return losses, norms, {k: v.clone() for k, v in model.state_dict().items()}


def _pipelined(layout, schedules, folder):
    mesh = ParallelMesh.build(layout)
    mode = make_mode("1d", mesh) if layout.tp > 1 else None
    dp = mesh.axis("dp")
    out = {}
    for schedule, virtual in schedules:
        torch.manual_seed(0)
        model = GPT(CFG, mode)                     # serial-identical initialisation on every rank
        plugin = HybridPlugin(mesh, "fp32", schedule, MICRO, virtual)
        wrapped, opt = plugin.configure(model, _optimizer(model))
        losses, norms = [], []
        for step in range(STEPS):
            mine = _global_batch(step, dp.size).split(MB)[dp.rank * MICRO:(dp.rank + 1) * MICRO]
            loss = plugin.execute_pipeline(list(mine), wrapped, lambda b: b[:, :-1],
                                           lambda logits, b: model.loss(logits, b[:, 1:]), opt)
            losses.append(float(loss))
            norms.append(float(opt.clip_grad_norm(0.5)))
            opt.step()
            opt.zero_grad()
        where = f"{folder}/{schedule}{virtual}"
        if mesh.is_main:
            import os
            os.makedirs(where, exist_ok=True)
        torch.distributed.barrier()
        plugin.checkpoint_io().save_model(model, where, mesh.global_rank)
        out[(schedule, virtual)] = (losses, norms, where)
    return out


SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)]


def _check(results, ref, dp):
    losses_ref, norms_ref, weights_ref = ref
    for key in results[0]:
        mean_losses = [sum(r[key][0][i] for r in results) / len(results) for i in range(STEPS)]
        assert mean_losses == pytest.approx(losses_ref, rel=1e-5), key      # dp ranks report their own mean
        assert results[0][key][1] == pytest.approx(norms_ref, rel=1e-5), key
        saved = load_file(f"{results[0][key][2]}/model.safetensors")
        for name, w in weights_ref.items():
            if name not in saved:                  # the tied weight is stored once, under its other name
                assert {name, *saved.keys() & {"wte.weight", "lm_head.weight"}} == {"wte.weight", "lm_head.weight"}
                continue
            got = saved[name]
            if name.endswith("attn.qkv.bias"):      # the key bias: zero gradient, Adam-amplified noise
                w, got = (torch.cat([t.chunk(3)[0], t.chunk(3)[2]]) for t in (w, got))
            assert torch.linalg.norm(got - w) <= 1e-5 * torch.linalg.norm(w), (key, name)


@pytest.mark.parametrize("pp", [2, 4])
def test_gpt_pipeline_schedules_match_serial(pp, tmp_path):
    results = run_distributed(_pipelined, world_size=pp, args=(Layout(pp=pp), SCHEDULES, str(tmp_path)))
    _check(results, _serial(1), 1)


def test_gpt_dp_pp_tp_on_eight_ranks_matches_serial(tmp_path):
    layout = Layout(dp=2, pp=2, tp=2)
    results = run_distributed(_pipelined, world_size=8, args=(layout, [("1f1b", 1), ("interleaved", 2)], str(tmp_path)))
    _check(results, _serial(2), 2)

"""LAMB and LARS take the trust ratios of whole parameters when the parameters are split:

- tensor parallelism: the tiny GPT split over 2 gloo ranks (1D) ends 5 steps with the serial
  model's weights (1e-5), with one all-reduce of the norm vector per step; without the reducer
  the split model drifts;
- ZeRO-2 over 2 ranks and small offloaded chunks: the weights of one process (1e-5), on a model
  whose parameters differ in scale between their halves, so that per-shard norms would show."""

import torch

from apps.gpt.config import GPTModelConfig
from apps.gpt.model import GPT
from core.config import OptimConfig
from core.distributed import Layout, ParallelMesh
from core.distributed.testing import run_distributed
from core.optim import build_optimizer
from core.optim.split_norms import attach
from core.tensor import make_mode

CFG = GPTModelConfig(n_layer=2, n_head=4, d_model=32, seq_len=16, vocab_size=64, bias=True)
STEPS = 5


def _optim(name: str) -> OptimConfig:
    return OptimConfig(name=name, lr=0.02 if name == "lamb" else 2.0, weight_decay=0.01, trust_clamp=10.0)


def _train(model: GPT, name: str, tp_axis=None, reducer: bool = True) -> tuple[dict, int]:
    g = torch.Generator().manual_seed(2)
    opt = build_optimizer(_optim(name), model)
    if reducer:
        attach(opt, tp_axis)
    calls = 0
    for _ in range(STEPS):
        batch = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len + 1), generator=g)
        model.loss(model(batch[:, :-1]), batch[:, 1:]).backward()
        before = tp_axis.stats.calls("tp", "all_reduce") if tp_axis is not None else 0
        opt.step()
        if tp_axis is not None:
            calls += tp_axis.stats.calls("tp", "all_reduce") - before
        opt.zero_grad()
    return model.serial_state_dict(), calls


def _serial(name: str) -> dict:
    torch.manual_seed(0)
    return _train(GPT(CFG), name)[0]


def _split(name: str, reducer: bool):
    mesh = ParallelMesh.build(Layout(tp=2))
    torch.manual_seed(0)
    serial = GPT(CFG).serial_state_dict()
    model = GPT(CFG, make_mode("1d", mesh))
    model.load_serial_state_dict(serial)
    return _train(model, name, mesh.axis("tp"), reducer)


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _both():
    return {name: (_split(name, True), _split(name, False)) for name in ("lamb", "lars")}


def test_split_parameters_step_like_the_whole_ones():
    runs = run_distributed(_both, world_size=2)[0]          # one set of ranks for both optimizers
    for name, ((weights, calls), (drifted, _)) in runs.items():
        _check_split(name, _serial(name), weights, calls, drifted)


def _check_split(name, ref, weights, calls, drifted):
    assert calls == STEPS                       # one all-reduce of the whole norm vector per step
    worst = 0.0
    for key, w in ref.items():
        got = weights[key]
        if key.endswith("attn.qkv.bias") and name == "lamb":
            # the key bias's gradient is exactly zero in exact arithmetic; Adam's (and so LAMB's)
            # division by sqrt(v) makes its rounding noise a full step: compare the q and v parts
            got, w = (torch.cat([t.chunk(3)[0], t.chunk(3)[2]]) for t in (got, w))
        assert _rel(got, w) <= 1e-5, key
    for key, w in ref.items():
        if w.ndim == 2:
            worst = max(worst, _rel(drifted[key], w))
    assert worst > 1e-3                          # per-shard norms would give other steps


class _SkewedGPT(GPT):
    """The first half of every parameter 8x larger than the second: with ranks holding different
    halves, per-shard norms would give other trust ratios than the whole parameter's (with an
    even model they would be nearly the same, and the comparison could not tell)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        with torch.no_grad():
            for p in self.parameters():
                p.view(-1)[: p.numel() // 2].mul_(8.0)


def _skewed(train, *args):
    import tests.apps.gpt.test_memory_parity as parity

    plain, parity.GPT = parity.GPT, _SkewedGPT
    try:
        return train(*args)
    finally:
        parity.GPT = plain


def _zero_runs(out_dir):
    from tests.apps.gpt.test_memory_parity import SMALL_CHUNKS

    kinds = (("zero2", ["parallel.zero=2"]), ("chunks_offloaded", ["parallel.offload=cpu", *SMALL_CHUNKS]))
    return {(name, kind): _skewed(_train_parity, f"{out_dir}/{name}-{kind}", 2, [*extra, *_over(name)])
            for name in ("lamb", "lars") for kind, extra in kinds}


def _train_parity(*args):
    from tests.apps.gpt.test_memory_parity import _train

    return _train(*args)


def _over(name):
    return [f"optim.name={name}", f"optim.lr={0.02 if name == 'lamb' else 2.0}"]


def test_zero_shards_step_like_whole_parameters(tmp_path):
    """ZeRO-2 over 2 ranks, and small chunks offloaded to host memory (parameters cut across
    chunks and shards): the same weights after 5 steps as one process (clipping and warm-up on),
    for LAMB and LARS."""
    runs = run_distributed(_zero_runs, world_size=2, args=(str(tmp_path),))[0]
    for name in ("lamb", "lars"):
        ref = _skewed(_train_parity, str(tmp_path / f"ref-{name}"), 1, _over(name))
        for kind in ("zero2", "chunks_offloaded"):
            run = runs[(name, kind)]
            assert run["losses"].keys() == ref["losses"].keys()
            for key, w in ref["weights"].items():
                assert _rel(run["weights"][key], w) <= 1e-5, (name, kind, key)

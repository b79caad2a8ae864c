"""LAMB and LARS take the trust ratios of whole parameters when the parameters are split:

- tensor parallelism: the tiny GPT split over 2 gloo ranks (1D) ends 5 steps with the serial
  model's weights (1e-5), with one all-reduce of the norm vector per step; without the reducer
  the split model drifts;
- ZeRO-2 over 2 ranks and small offloaded chunks: the weights of one process (1e-5), on a model
  whose parameters differ in scale between their halves, so that per-shard norms would show;
- both at once, tp=2 x ZeRO-2 over dp=2 on 4 ranks, through the trainer: the unsplit weights of
  its checkpoint are the one-process run's (1e-5)."""

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
    import tests.core.memory.test_gpt_memory_parity as parity

    plain, parity.GPT = parity.GPT, _SkewedGPT
    try:
        return train(*args)
    finally:
        parity.GPT = plain


def _zero_runs(out_dir):
    from tests.core.memory.test_gpt_memory_parity import SMALL_CHUNKS

    kinds = (("zero2", ["parallel.zero=2"]), ("chunks_offloaded", ["parallel.offload=cpu", *SMALL_CHUNKS]))
    return {(name, kind): _skewed(_train_parity, f"{out_dir}/{name}-{kind}", 2, [*extra, *_over(name)])
            for name in ("lamb", "lars") for kind, extra in kinds}


def _train_parity(*args):
    from tests.core.memory.test_gpt_memory_parity import _train

    return _train(*args)


def _over(name):
    # LAMB's epsilon 1e-6: its Adam-like moments move an element whose gradient is rounding noise
    # around zero by a full step in a direction the noise sets; with 1e-8 tensor parallelism's own
    # summation order put tp=2 x ZeRO-2 at 1.5e-5 from one process
    return [f"optim.name={name}", f"optim.lr={0.02 if name == 'lamb' else 2.0}"] + (
        ["optim.eps=1e-6"] if name == "lamb" else [])


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


def _train_tp_zero(out_dir: str, name: str, layout: Layout, overrides: list[str]) -> dict:
    """5 steps of the skewed GPT (clipping and warm-up on) through the trainer: the serial one on
    one process, or split 1D over tp with ZeRO over dp; the weights as the last checkpoint holds
    them (unsplit)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from core.config import Recipe, load_recipe
    from core.trainer import Trainer, TrainTask
    from tests.core.memory.test_gpt_memory_parity import GLOBAL_BATCH, MODEL, STEPS as PARITY_STEPS, _data

    mesh = ParallelMesh.build(layout)
    dp = mesh.size("dp")
    cfg = load_recipe(Recipe, None, [
        f"output.dir={out_dir}", "output.overwrite=true", "train.progress=false", "train.log_every=1",
        f"train.steps={PARITY_STEPS}", f"train.micro_batch={GLOBAL_BATCH // dp}", "train.eval_every=0",
        "train.warmup_steps=2", "train.grad_clip=0.5", "optim.weight_decay=0.1", "parallel.device=cpu",
        *_over(name), *overrides])
    torch.manual_seed(0)
    serial = _SkewedGPT(MODEL).serial_state_dict()
    model = GPT(MODEL, make_mode("1d", mesh)) if mesh.size("tp") > 1 else GPT(MODEL)
    model.load_serial_state_dict(serial)

    def loss(m, batch):
        (tokens,) = batch
        return model.loss(m(tokens[:, :-1]), tokens[:, 1:])

    trainer = Trainer(cfg, mesh, TrainTask(model=model, loss_fn=loss, train_data=_data()))
    trainer.fit()
    saved = sorted(Path(out_dir).rglob("model.safetensors"))[-1]
    out = {"losses": dict(trainer.step_losses), "weights": load_file(str(saved)), "plugin": trainer.plugin.name}
    if trainer.plugin.name == "zero":          # the unsplit file loads back into this rank's shards
        plugin = trainer.plugin
        before = plugin.optimizer.master_state()
        plugin.optimizer.load_master({k: torch.zeros_like(v) for k, v in before.items()})
        plugin.checkpoint_io().load_model(model, saved.parent)
        after = plugin.optimizer.master_state()
        out["reloaded"] = all(torch.equal(before[k], after[k]) for k in before)
        out["optimizer_files"] = sorted(f.name for f in saved.parent.glob("optimizer*.pt"))
    return out


def _tp_zero_runs(out_dir):
    return {name: _train_tp_zero(f"{out_dir}/{name}", name, Layout(dp=2, tp=2), ["parallel.zero=2"])
            for name in ("lamb", "lars")}


def test_tensor_parallel_parts_with_zero_shards_step_like_whole_parameters(tmp_path):
    """tp=2 x ZeRO-2 over dp=2 (4 ranks): every parameter is cut twice, by the 1D layers and by
    the chunk shards; the checkpoint's unsplit weights after 5 steps are the one-process run's
    (1e-5), for LAMB and LARS."""
    runs = run_distributed(_tp_zero_runs, world_size=4, args=(str(tmp_path),))[0]
    for name in ("lamb", "lars"):
        ref = _train_tp_zero(str(tmp_path / f"ref-{name}"), name, Layout(), [])
        run = runs[name]
        assert run["plugin"] == "zero" and ref["plugin"] == "ddp"
        assert run["reloaded"] and run["optimizer_files"] == ["optimizer.tp0.pt", "optimizer.tp1.pt"]
        for step, value in ref["losses"].items():      # (LAMB's step 5 loss: 1.4e-5 apart, weights 7e-6)
            assert abs(run["losses"][step] - value) <= 1e-4 * abs(value), (name, step)
        assert run["weights"].keys() == ref["weights"].keys()
        for key, w in ref["weights"].items():
            got = run["weights"][key]
            if key.endswith("attn.qkv.bias") and name == "lamb":
                got, w = (torch.cat([t.chunk(3)[0], t.chunk(3)[2]]) for t in (got, w))   # see _check_split
            assert _rel(got, w) <= 1e-5, (name, key, _rel(got, w))

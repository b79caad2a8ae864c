"""`strategy="loom"` against Lightning's own ddp strategy on the same LightningModule, data and
Trainer settings (5 steps, accumulate_grad_batches=2, gradient_clip_val=0.5, AdamW), on 1 and 2
processes over gloo: every micro-batch's loss and the weights after training, 1e-5 in fp32, for
the DDP plugin, ZeRO-2, ZeRO-3 with NVMe offload under a budget that evicts, and bf16. A checkpoint
saved mid-run resumes exactly through Lightning's API and loads into a plain LightningModule; what
Loom cannot do is refused at setup, in one message."""

import pytest
import pytorch_lightning as pl
import torch

import core.integrations.lightning as loom_lightning
from core.config import ConfigError
from core.errors import LoomError
from core.integrations.lightning import LoomStrategy, load_weights, to_lightning_checkpoint
from tests.core.integrations.lightning_module import Classifier, loader


@pytest.fixture(autouse=True)
def fresh_environment(monkeypatch):
    # Lightning's launchers leave MASTER_PORT (and friends) in the parent, and a one-process ddp run
    # leaves its process group joined (a forked rank would inherit it): each test starts clean
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GLOBAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fit(tmp_path, strategy, name, devices=1, steps=5, samples=64, precision="32-true", ckpt_path=None, module=None,
        **trainer):
    """Train a fresh Classifier (or `module`); returns (module with this rank's final weights, this rank's
    losses). Each rank reads its own file: rank 0's may not be written yet when rank 1 leaves fit."""
    module = module or Classifier(losses_to=str(tmp_path / name))
    trainer = {"enable_checkpointing": False} | trainer
    t = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, accumulate_grad_batches=2,
                   gradient_clip_val=0.5, precision=precision, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path / name, **trainer)
    t.fit(module, loader(samples), ckpt_path=ckpt_path)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    losses = [float(x) for x in (tmp_path / f"{name}.rank{rank}").read_text().split()]
    return module, losses, t


def close(a: torch.nn.Module, b: torch.nn.Module, tol: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.linalg.norm(p.detach() - q.detach()) <= tol * torch.linalg.norm(q.detach()), name


ONE_PROCESS = {
    "ddp": dict(strategy="loom"),
    "zero2": dict(strategy=LoomStrategy(zero=2)),
    # a device budget below the model's chunks: chunks leave for the disk and come back every step
    "zero3-nvme": dict(strategy=LoomStrategy(zero=3, offload="nvme", memory={"chunk_mb": 0.002, "device_gb": 6.2e-6})),
}


@pytest.mark.parametrize("case", list(ONE_PROCESS))
def test_one_process_trains_as_lightnings_ddp(tmp_path, case, capfd):
    ref, ref_losses, _ = fit(tmp_path, "ddp", "ref")
    got, losses, trainer = fit(tmp_path, ONE_PROCESS[case]["strategy"], case)
    if case == "zero3-nvme":
        report = next(line for line in capfd.readouterr().err.splitlines() if line.startswith("memory: "))
        assert int(report.split(" evictions")[0].rsplit(" ", 1)[1]) > 5, report
    assert isinstance(trainer.strategy, LoomStrategy)
    assert len(losses) == 10 and losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    close(got, ref, 1e-5)
    assert all(not p.is_meta for p in got.parameters())      # ordinary parameters after fit


def test_bf16_trains_as_lightnings_ddp_in_bf16(tmp_path):
    ref, ref_losses, _ = fit(tmp_path, "ddp", "ref", precision="bf16-mixed")
    got, losses, _ = fit(tmp_path, "loom", "bf16", precision="bf16-mixed")
    fp32, _, _ = fit(tmp_path, "ddp", "fp32")
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    close(got, ref, 1e-5)
    # and bf16 is in force: the weights are not fp32's
    assert any(not torch.equal(p, q) for p, q in zip(got.parameters(), fp32.parameters()))


def _rank(tmp_path, name: str, loom: dict | None) -> tuple[list[float], dict]:
    """One of two ranks started as torchrun starts them (Lightning launches nothing): Lightning's ddp,
    or strategy=loom with `loom`'s keys; this rank's losses and final weights."""
    strategy = "ddp" if loom is None else LoomStrategy(**loom)
    module, losses, trainer = fit(tmp_path, strategy, name, devices=2)
    rank = torch.distributed.get_rank()
    # the collectives Lightning code calls on a strategy
    s = trainer.strategy
    s.barrier("check")
    mine = torch.tensor([float(rank + 1)])
    collectives = (s.broadcast(f"from rank {rank}", src=0), float(s.reduce(mine.clone(), reduce_op="sum")),
                   float(s.reduce(mine.clone(), reduce_op="mean")), s.all_gather(mine).flatten().tolist())
    return losses, {k: v.detach().clone() for k, v in module.state_dict().items()}, collectives


def test_two_processes_train_as_lightnings_ddp(tmp_path):
    from core.distributed.testing import run_distributed

    ref = run_distributed(_rank, world_size=2, args=(tmp_path, "ref", None))
    for name, keys in (("zero2", {"zero": 2}),
                       ("zero3-nvme", {"zero": 3, "offload": "nvme",
                                       "memory": {"chunk_mb": 0.002, "device_gb": 6.2e-6}})):
        got = run_distributed(_rank, world_size=2, args=(tmp_path, name, keys))
        for (losses, weights, collectives), (ref_losses, ref_weights, _) in zip(got, ref):
            assert collectives == ("from rank 0", 3.0, 1.5, [1.0, 2.0]), name
            assert len(losses) == 10 and losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), name
            for k, w in ref_weights.items():
                assert torch.linalg.norm(weights[k] - w) <= 1e-5 * torch.linalg.norm(w), (name, k)
        assert got[0][0] != got[1][0]                          # the ranks had different samples
        assert all(torch.equal(got[0][1][k], got[1][1][k]) for k in got[0][1])     # and the same weights


def _lm(tmp_path, family: str, name: str, tp: int) -> tuple[list[float], dict]:
    """Train the transformers model of `family` inside a LightningModule for 3 steps: Lightning's ddp
    on one process (tp=1), or strategy=loom with tp ranks; the losses and the unsplit weights."""
    from core.tensor import serial_state_dict
    from tests.core.integrations.lightning_module import CausalLM, token_loader

    module = CausalLM(family, losses_to=str(tmp_path / name))
    t = pl.Trainer(accelerator="cpu", devices=tp, strategy="ddp" if tp == 1 else LoomStrategy(tp=tp), max_steps=3,
                   accumulate_grad_batches=2, gradient_clip_val=0.5, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   default_root_dir=tmp_path / name)
    t.fit(module, token_loader())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    losses = [float(x) for x in (tmp_path / f"{name}.rank{rank}").read_text().split()]
    held = tuple(module.model.lm_head.weight.shape)          # this rank's part of the head
    return losses, {k: v.detach().clone() for k, v in serial_state_dict(module.model).items()}, held


def test_tensor_parallelism_splits_the_transformers_model_inside_a_module(tmp_path):
    """tp=2 on 2 ranks (one data-parallel rank: both see the same batches) trains the model under its
    own forward and loss as one process under Lightning's ddp trains it."""
    from core.distributed.testing import run_distributed

    for family in ("llama", "opt"):
        ref_losses, ref, _ = _lm(tmp_path, family, f"{family}-ref", 1)
        torch.distributed.destroy_process_group()
        for losses, weights, held in run_distributed(_lm, world_size=2, args=(tmp_path, family, f"{family}-tp", 2)):
            assert held == (32, 32)                                 # half the vocabulary's rows on each rank
            assert len(losses) == 6 and losses == pytest.approx(ref_losses, rel=1e-5), family
            assert weights.keys() == ref.keys()
            for k, w in ref.items():
                assert torch.linalg.norm(weights[k] - w) <= 1e-5 * torch.linalg.norm(w) + 1e-7, (family, k)


def test_save_and_resume_continue_exactly_and_load_into_a_plain_module(tmp_path):
    # 24 samples = 3 steps of 2 x 4: the checkpoint falls between epochs, where Lightning resumes exactly
    from pytorch_lightning.callbacks import ModelCheckpoint

    straight, straight_losses, _ = fit(tmp_path, LoomStrategy(zero=2), "straight", steps=6, samples=24)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=3, save_top_k=-1)
    first, first_losses, trainer = fit(tmp_path, LoomStrategy(zero=2), "first", steps=3, samples=24,
                                       callbacks=[saver], enable_checkpointing=True)
    ckpt = tmp_path / "ckpts" / "epoch=0-step=3.ckpt"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / loom_lightning.LIGHTNING_STATE).is_file()
    resumed, resumed_losses, _ = fit(tmp_path, LoomStrategy(zero=2), "resumed", steps=6, samples=24, ckpt_path=ckpt)
    assert first_losses + resumed_losses == straight_losses
    close(resumed, straight, 1e-6)
    # the weights go back into a plain module, and into Lightning's own single-file form
    plain = load_weights(Classifier(), ckpt)
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), first.parameters()))
    single = Classifier.load_from_checkpoint(to_lightning_checkpoint(ckpt, tmp_path / "step3-single.ckpt"))
    assert all(torch.equal(p, q) for p, q in zip(single.parameters(), first.parameters()))
    # saved after fit: the weights, but the optimizer states are gone, so it refuses to resume
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    assert all(torch.equal(p, q) for p, q in zip(load_weights(Classifier(), tmp_path / "after.ckpt").parameters(),
                                                 first.parameters()))
    with pytest.raises(LoomError, match="was saved after fit had ended"):
        fit(tmp_path, LoomStrategy(zero=2), "again", steps=6, samples=24, ckpt_path=tmp_path / "after.ckpt")


class Manual(Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


def test_what_loom_cannot_do_is_refused_at_setup(tmp_path):
    # (several optimizers need manual optimization: Lightning itself refuses them otherwise)
    cases = [
        (Manual(), {}, "Manual sets automatic_optimization=False: strategy=loom steps the optimizer itself"),
        (Classifier(), {"gradient_clip_algorithm": "value"}, "gradient_clip_algorithm='value': strategy=loom clips"),
        (Classifier(), {"sync_batchnorm": True}, "Trainer\\(sync_batchnorm=True\\) is not supported"),
    ]
    for module, trainer, says in cases:
        t = pl.Trainer(accelerator="cpu", devices=1, strategy="loom", max_steps=1, logger=False,
                       enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
                       **({"gradient_clip_val": 0.5} | trainer))
        with pytest.raises(LoomError, match=says):
            t.fit(module, loader())
    with pytest.raises(LoomError, match="parallel.pp=2: the Lightning strategy spreads a LightningModule with data"):
        LoomStrategy(pp=2)
    with pytest.raises(LoomError, match="parallel.tp_mode=2d: the Lightning strategy splits the transformers models"):
        LoomStrategy(tp=4, tp_mode="2d")
    with pytest.raises(ConfigError, match="LoomStrategy\\(zeros=...\\): not a key of a recipe's parallel or memory"):
        LoomStrategy(zeros=3)
    with pytest.raises(ConfigError, match="parallel.zero: got 4; allowed: 0, 1, 2, 3"):
        LoomStrategy(zero=4)
    with pytest.raises(LoomError, match="LoomStrategy\\(precision='bf16'\\) and Trainer\\(precision='32-true'\\)"):
        fit(tmp_path, LoomStrategy(precision="bf16"), "clash")


def test_validation_runs_the_module_as_it_is(tmp_path):
    module = Classifier()
    before = [p.detach().clone() for p in module.parameters()]
    t = pl.Trainer(accelerator="cpu", devices=1, strategy="loom", logger=False, enable_progress_bar=False,
                   default_root_dir=tmp_path)

    class Scored(Classifier):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    scored = Scored()
    scored.load_state_dict(module.state_dict())
    (result,) = t.validate(scored, loader())
    x, y = loader().dataset.tensors
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(module.net(x), y).item()
    assert result["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(scored.parameters(), before))


def test_the_unified_lightning_package_takes_the_strategy_too(tmp_path):
    """`import lightning as L` users: L.Trainer(strategy="loom") and the strategy made on its classes."""
    import lightning.pytorch as unified

    from core.integrations.lightning import LightningLoomStrategy
    from tests.core.integrations.lightning_module import UnifiedClassifier

    def run(strategy, name):
        module = UnifiedClassifier(losses_to=str(tmp_path / name))
        t = unified.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=5, accumulate_grad_batches=2,
                            gradient_clip_val=0.5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path / name)
        t.fit(module, loader())
        return module, [float(x) for x in (tmp_path / f"{name}.rank0").read_text().split()], t

    ref, ref_losses, _ = run("ddp", "ref")
    for name, strategy in (("by-name", "loom"), ("zero2", LightningLoomStrategy(zero=2))):
        got, losses, trainer = run(strategy, name)
        assert isinstance(trainer.strategy, LightningLoomStrategy)
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), name
        close(got, ref, 1e-5)


def test_nothing_else_in_loom_imports_lightning():
    import subprocess
    import sys

    probe = ("import sys, core.session, core.trainer, core.booster, core.hf, apps.gpt.pretrain, "
             "apps.diffusion.finetune, apps.protein.infer; print(sorted(m for m in sys.modules if 'lightning' in m))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"

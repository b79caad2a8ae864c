"""The GPT entry points end to end: --help, short runs, errors, torchrun, generate, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import apps.gpt.pretrain as pretrain
from apps.gpt.config import GPTRecipe
from core.config import load_recipe
from core.distributed.testing import run_distributed
from tests.commands import run_at_once

REPO = Path(__file__).resolve().parents[3]
QUICK_MODEL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.seq_len=32",
               "train.progress=false", "sample.tokens=8"]


def run(args, tmp_path, check=True, timeout=300):
    env = dict(os.environ, LOOM_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = run_at_once([args], env=env, timeout=timeout)[0]
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def test_help_lists_every_key():
    # a fresh interpreter, as a user starts it (the other commands here fork from the harness's forkserver)
    r = subprocess.run([sys.executable, "-m", "apps.gpt.pretrain", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for text in ("usage: python -m apps.gpt.pretrain", "train.steps (int [1..]", "model.n_layer",
                 "parallel.dp", "output.dir", "Known recipes: gpt/gpt2-124m, gpt/gpt2-medium-3axis, gpt/gpt2-xl-nvme, gpt/gpt3-175b, gpt/large-batch-lamb, gpt/llama-tiny-code, gpt/tiny", "torchrun"):
        assert text in r.stdout, text


def test_three_steps_of_the_default_recipe_then_generate(tmp_path):
    out = tmp_path / "run"
    # the embedded default (stdlib corpus, BPE, tiny recipe), cut to 300 kB of text and 3 steps
    run([sys.executable, "-m", "apps.gpt.pretrain", "train.steps=3", "data.max_bytes=300000",
         "data.bpe_vocab=512", f"output.dir={out}", "train.progress=false"], tmp_path)
    assert (out / "checkpoints" / "step_0000003" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and "eval_loss" in rows[-1]
    # generate's own main on a forked rank (its command line and errors: test_bad_input_... below)
    assert generate(tmp_path, out, prompt="import os", tokens=12).startswith("import os")


def test_bad_input_ends_with_one_line_and_status_2(tmp_path):
    cases = [
        (["train.setps=3"], "error: unknown key 'train.setps' (on the command line); did you mean 'train.steps'?"),
        (["parallel.tp=2"], "error: parallel.tp=2 x parallel.pp=1 x parallel.sp=1 = 2 does not divide the world size 1"),
        (["data.path=/nonexistent"], "error: data.path: /nonexistent is not a folder"),
        (["--recipe", "gpt/huge"], "error: recipe 'gpt/huge' not found"),
    ]
    results = run_at_once([[sys.executable, "-m", "apps.gpt.pretrain", f"output.dir={tmp_path / str(i)}", *args]
                           for i, (args, _) in enumerate(cases)]
                          + [[sys.executable, "-m", "apps.gpt.generate", "--checkpoint", str(tmp_path)]],
                          env=dict(os.environ, LOOM_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1"))
    for (args, message), r in zip(cases, results):
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (args, r.stderr)
    r = results[-1]
    assert r.returncode == 2 and "not a Loom checkpoint folder nor a run folder" in r.stderr


def _losses(out_dir):
    """(training losses, evaluation losses) in the order metrics.jsonl logged them."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


def _torchrun(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "apps.gpt.pretrain", *args]


def _main(module: str, argv: list[str]) -> str:
    """One rank of `python -m <module> <argv>`: the module's own `main`; what it printed."""
    import contextlib
    import importlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert importlib.import_module(module).main(argv) == 0
    return out.getvalue()


def ranks(nproc, tmp_path, *args, module="apps.gpt.pretrain") -> str:
    """`python -m apps.gpt.pretrain <args>` on `nproc` ranks that the test harness forks and gives
    the variables torchrun gives (torchrun itself is started in the data-parallel test below and in
    tests/reliability, once per launch path: each start costs seconds of imports); rank 0's stdout."""
    return run_distributed(_main, world_size=nproc, args=(module, list(args)), timeout=300,
                           env={"LOOM_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"})[0]


def generate(tmp_path, checkpoint, prompt="line", tokens=4) -> str:
    return ranks(1, tmp_path, "--checkpoint", str(checkpoint), "--prompt", prompt, "--max-new-tokens", str(tokens),
                 "--temperature", "0", module="apps.gpt.generate")


def test_torchrun_data_parallel_matches_one_process(tmp_path, text_folder):
    # model.bias=false: the attention key bias gets an exactly-zero gradient (softmax ignores a
    # shift shared by all keys), so Adam turns rounding noise into its updates and no two
    # summation orders agree on it. Every other weight agrees to ~2e-7 with or without biases.
    common = [f"data.path={text_folder}", "data.tokenizer=bytes", "train.steps=5", "train.log_every=1",
              "train.eval_every=5", "optim.lr=0.01", "train.warmup_steps=0", "model.bias=false",
              *QUICK_MODEL]
    run(_torchrun(2, *common, "parallel.dp=2", "train.micro_batch=2", f"output.dir={tmp_path / 'ddp'}"), tmp_path)
    ranks(1, tmp_path, *common, "train.micro_batch=4", f"output.dir={tmp_path / 'one'}")

    (ddp_loss, ddp_eval), (one_loss, one_eval) = _losses(tmp_path / "ddp"), _losses(tmp_path / "one")
    assert len(ddp_loss) == 5
    assert ddp_loss == pytest.approx(one_loss, rel=1e-6) and ddp_eval == pytest.approx(one_eval, rel=1e-6)
    a = load_file(tmp_path / "ddp" / "checkpoints" / "step_0000005" / "model.safetensors")
    b = load_file(tmp_path / "one" / "checkpoints" / "step_0000005" / "model.safetensors")
    for k in b:
        assert torch.linalg.norm(a[k] - b[k]) <= 1e-6 * torch.linalg.norm(b[k]), k
    meta = json.loads((tmp_path / "ddp" / "checkpoints" / "step_0000005" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["layout"]["dp"] == 2
    # the same steps with each sequence split over 2 ranks (all-to-all attention): the losses and
    # evaluation of one process (Adam's elementwise steps leave the weights ~1e-5 apart; the model
    # tests compare them exactly under SGD)
    ranks(2, tmp_path, *common, "parallel.sp=2", "parallel.sp_mode=all_to_all", "train.micro_batch=4",
          f"output.dir={tmp_path / 'sp'}")
    sp_loss, sp_eval = _losses(tmp_path / "sp")
    assert sp_loss == pytest.approx(one_loss, rel=1e-5) and sp_eval == pytest.approx(one_eval, rel=1e-5)


def test_torchrun_with_a_layout_that_does_not_fit(tmp_path):
    r = run(_torchrun(2, "parallel.dp=4", f"output.dir={tmp_path}"), tmp_path, check=False)
    assert r.returncode != 0
    assert "needs 4 processes but the world size is 2; layouts that fit 2 processes: dp=2" in r.stderr


def test_gpt_resume_after_a_stop_is_bitwise_identical(tmp_path, text_folder, monkeypatch):
    overrides = [f"data.path={text_folder}", "data.tokenizer=bytes", f"data.cache_dir={tmp_path / 'cache'}",
                 "train.steps=6", "train.checkpoint_every=2", "train.log_every=1", "model.dropout=0.1",
                 "train.micro_batch=4", *QUICK_MODEL]
    unbroken = pretrain.train(load_recipe(GPTRecipe, "gpt/tiny", overrides + [f"output.dir={tmp_path / 'a'}"]))

    calls = {"n": 0}
    real_loss = pretrain.next_token_loss

    def stop_in_step_4(model, batch, *rest):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_loss(model, batch, *rest)

    monkeypatch.setattr(pretrain, "next_token_loss", stop_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        pretrain.train(load_recipe(GPTRecipe, "gpt/tiny", overrides + [f"output.dir={tmp_path / 'b'}"]))
    monkeypatch.setattr(pretrain, "next_token_loss", real_loss)
    resumed = pretrain.train(load_recipe(GPTRecipe, "gpt/tiny", overrides + [f"output.dir={tmp_path / 'b'}",
                                                                               "train.resume=latest"]))
    assert resumed["loss"] == unbroken["loss"] and resumed["eval_loss"] == unbroken["eval_loss"]
    rows_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    rows_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k in ("step", "loss", "eval_loss")} for r in rows]
    assert strip(rows_a) == strip(rows_b)        # every step's loss, bitwise
    a = load_file(tmp_path / "a" / "checkpoints" / "step_0000006" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step_0000006" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_offload_and_zero_from_the_recipe(tmp_path, text_folder):
    """The recipe alone turns on NVMe offload (one process, a budget of two chunks for four) and
    ZeRO-3 with host offload (two ranks); both train, report what moved, and leave checkpoints a
    plain model loads (generate reads them)."""
    common = [f"data.path={text_folder}", "data.tokenizer=bytes", "train.steps=4", "train.eval_every=2",
              "train.checkpoint_every=4", "train.micro_batch=4", *QUICK_MODEL]
    nvme = tmp_path / "nvme"
    r = run([sys.executable, "-m", "apps.gpt.pretrain", *common, "parallel.offload=nvme",
             "memory.chunk_mb=0.01", "memory.device_gb=0.00008", f"output.dir={nvme}"], tmp_path)
    report = next(line for line in r.stderr.splitlines() if line.startswith("memory: "))
    evictions = int(report.split(" evictions")[0].rsplit(" ", 1)[1])
    assert evictions > 4 and "NVMe" in report, report
    assert (nvme / "sample.txt").is_file()
    zero = tmp_path / "zero3"
    ranks(2, tmp_path, *common, "parallel.dp=2", "parallel.zero=3", "parallel.offload=cpu", f"output.dir={zero}")
    for out in (nvme, zero):
        assert generate(tmp_path, out).startswith("line")


def test_tensor_parallel_matches_one_process(tmp_path, text_folder):
    """`parallel.tp=4 parallel.tp_mode=2d` trains like one process and the checkpoint holds the
    unsplit weights (generate loads them into a serial model). 1D runs in the dp x tp test below;
    what a mode cannot split is refused before any process joins (tests/core/test_session.py,
    tests/core/tensor/test_gpt_tensor_parallel.py)."""
    common = [f"data.path={text_folder}", "data.tokenizer=bytes", "train.steps=4", "train.log_every=1",
              "train.eval_every=4", "optim.lr=0.01", "train.warmup_steps=0", "model.bias=false",
              "train.micro_batch=4", "train.checkpoint_every=4", *QUICK_MODEL]
    ranks(4, tmp_path, *common, "parallel.tp=4", "parallel.tp_mode=2d", "parallel.dp=1", f"output.dir={tmp_path / 'tp'}")
    ranks(1, tmp_path, *common, f"output.dir={tmp_path / 'one'}")

    (tp_loss, tp_eval), (one_loss, one_eval) = _losses(tmp_path / "tp"), _losses(tmp_path / "one")
    assert len(tp_loss) == 4
    assert tp_loss == pytest.approx(one_loss, rel=1e-5) and tp_eval == pytest.approx(one_eval, rel=1e-5)
    a = load_file(tmp_path / "tp" / "checkpoints" / "step_0000004" / "model.safetensors")
    b = load_file(tmp_path / "one" / "checkpoints" / "step_0000004" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in b:
        assert torch.linalg.norm(a[k] - b[k]) <= 1e-5 * torch.linalg.norm(b[k]), k
    assert generate(tmp_path, tmp_path / "tp").startswith("line")


def test_data_times_tensor_parallel_on_four_ranks(tmp_path, text_folder):
    """dp=2 x tp=2: DDP over the data axis around the split model; same global batch as one process."""
    common = [f"data.path={text_folder}", "data.tokenizer=bytes", "train.steps=4", "train.log_every=1",
              "train.eval_every=4", "optim.lr=0.01", "train.warmup_steps=0", "model.bias=false",
              "train.micro_batch=2", "train.global_batch=8", "train.checkpoint_every=4", *QUICK_MODEL]
    ranks(4, tmp_path, *common, "parallel.tp=2", "parallel.dp=2", f"output.dir={tmp_path / 'hybrid'}")
    ranks(1, tmp_path, *common, f"output.dir={tmp_path / 'one'}")

    hybrid, one = _losses(tmp_path / "hybrid")[0], _losses(tmp_path / "one")[0]
    assert len(hybrid) == 4 and hybrid == pytest.approx(one, rel=1e-5)
    a = load_file(tmp_path / "hybrid" / "checkpoints" / "step_0000004" / "model.safetensors")
    b = load_file(tmp_path / "one" / "checkpoints" / "step_0000004" / "model.safetensors")
    for k in b:
        assert torch.linalg.norm(a[k] - b[k]) <= 1e-5 * torch.linalg.norm(b[k]), k
    meta = json.loads((tmp_path / "hybrid" / "checkpoints" / "step_0000004" / "meta.json").read_text())
    assert meta["layout"]["dp"] == 2 and meta["layout"]["tp"] == 2
    assert generate(tmp_path, tmp_path / "hybrid").startswith("line")


def test_pipeline_matches_one_process(tmp_path, text_folder):
    """`parallel.pp=2` with 1F1B and with the interleaved schedule trains like one process
    accumulating the same micro-batches (losses, eval loss, checkpoint weights), the checkpoint
    loads into a serial model for generation and a serial checkpoint starts a pipelined run."""
    common = [f"data.path={text_folder}", "data.tokenizer=bytes", "train.steps=3", "train.log_every=1",
              "train.eval_every=3", "optim.lr=0.01", "train.warmup_steps=0", "model.bias=false",
              "train.micro_batch=2", "train.checkpoint_every=3", *QUICK_MODEL, "model.n_layer=4"]
    pipe = ["parallel.pp=2", "parallel.microbatches=4"]
    ranks(2, tmp_path, *common, *pipe, f"output.dir={tmp_path / 'pp'}")
    ranks(2, tmp_path, *common, *pipe, "parallel.pp_schedule=interleaved", "parallel.virtual_stages=2",
          f"output.dir={tmp_path / 'vpp'}")
    ranks(1, tmp_path, *common, "train.grad_accum=4", f"output.dir={tmp_path / 'one'}")
    one_loss, one_eval = _losses(tmp_path / "one")
    b = load_file(tmp_path / "one" / "checkpoints" / "step_0000003" / "model.safetensors")
    for name in ("pp", "vpp"):
        loss, ev = _losses(tmp_path / name)
        assert len(loss) == 3 and loss == pytest.approx(one_loss, rel=1e-5) and ev == pytest.approx(one_eval, rel=1e-5)
        a = load_file(tmp_path / name / "checkpoints" / "step_0000003" / "model.safetensors")
        assert a.keys() == b.keys()
        for k in b:
            assert torch.linalg.norm(a[k] - b[k]) <= 1e-5 * torch.linalg.norm(b[k]), (name, k)
    assert generate(tmp_path, tmp_path / "pp").startswith("line")
    # and back: the one-process checkpoint starts a pipelined run (lr 0: its weights stay, so the
    # pipelined evaluation equals the one-process run's final one)
    ranks(2, tmp_path, *common, *pipe, "train.steps=1", "optim.lr=0", "train.eval_every=1",
          f"train.init_weights={tmp_path / 'one' / 'checkpoints' / 'step_0000003'}", f"output.dir={tmp_path / 'back'}")
    assert _losses(tmp_path / "back")[1] == pytest.approx(one_eval, rel=1e-5)
    # what a pipeline cannot run (layers that do not divide into stages, too few micro-batches) is
    # refused with one line: tests/core/pipeline/test_schedule.py, and under torchrun
    # tests/reliability/test_torchrun_refusal.py

"""The allocation counter the planner's accuracy benchmark measures memory with
(benchmarks/heapcount.c, preloaded): it counts what is allocated and not freed, on every thread,
and its peak; the Trainer reports the steps' peak from it."""

import os
import subprocess
import sys
import textwrap

from benchmarks._heap import build

PROBE = textwrap.dedent("""
    import threading, torch
    from core.memory.usage import allocated_bytes, allocated_peak, reset_peak
    cpu = torch.device("cpu")
    MiB = 2**20
    start = allocated_bytes(cpu)
    kept = torch.ones(64 * MiB // 4)
    reset_peak(cpu)
    passing = torch.ones(32 * MiB // 4); del passing
    def elsewhere():                      # made and freed on another thread: counted all the same
        t = torch.ones(48 * MiB // 4); del t
    thread = threading.Thread(target=elsewhere); thread.start(); thread.join()
    print((allocated_bytes(cpu) - start) / MiB, (allocated_peak(cpu) - start) / MiB)
""")


def test_it_counts_what_lives_and_the_peak_since_a_reset(tmp_path):
    env = {**os.environ, "LD_PRELOAD": str(build(tmp_path))}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    live, peak = map(float, out.stdout.split())
    assert 64 <= live < 65                  # the kept tensor (and a few small objects)
    assert 64 + 48 <= peak < 64 + 49        # the largest moment: kept + the other thread's


def test_without_it_the_host_has_no_allocated_count():
    code = "import torch; from core.memory.usage import allocated_peak; print(allocated_peak(torch.device('cpu')))"
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


TRAIN = textwrap.dedent("""
    import contextlib, io, sys
    from apps.gpt.config import GPTRecipe
    from apps.gpt.pretrain import train
    from core.config import load_recipe
    cfg = load_recipe(GPTRecipe, "gpt/tiny", sys.argv[1:])
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(cfg)
    print(summary["step_peak_allocated_bytes"], summary["step_peak_memory_bytes"])
""")


def test_the_trainer_reports_the_steps_allocated_peak(tmp_path):
    env = {**os.environ, "LD_PRELOAD": str(build(tmp_path)), "LOOM_CACHE": str(tmp_path / "cache")}
    argv = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.seq_len=32", "data.tokenizer=bytes",
            "data.max_bytes=20000", "train.steps=2", "train.global_batch=4", "train.micro_batch=4",
            "train.eval_every=0", "sample.tokens=0", "train.progress=false", f"output.dir={tmp_path / 'run'}"]
    out = subprocess.run([sys.executable, "-c", TRAIN, *argv], env=env, capture_output=True, text=True, check=True)
    allocated, resident = map(int, out.stdout.split()[-2:])
    # everything the process holds at the steps' peak: at least the weights, gradients and AdamW's
    # two moments of its 21.6 k parameters (1 layer x 32 wide, 257 tokens, 32 positions), less than
    # its resident set (which also holds the interpreter and torch's libraries)
    assert 16 * 21_600 < allocated < resident

"""The C++ CPU Adam against torch's AdamW (fused and foreach) on 100 M parameters.

Every variant does the same work per step, the optimizer step of mixed-precision training with
offloaded states: take the gradient of the bf16 working weights, update the fp32 master
weights and both moments (AdamW), write the new bf16 working copy. The C++ kernel reads the
bf16 gradient and writes the copy in its one pass; torch's optimizers need the gradient in fp32
first (a copy) and the working copy after (another). The same is also reported with fp32
gradients (where only the working copy differs). Also: the memory bandwidth the kernel reaches
against the bandwidth of a large `torch.add` (STREAM's add) measured in the same run.

    python -m benchmarks.cpu_adam [--params 100e6] [--steps 9]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from benchmarks._machine import machine
from loom_kernels.cpu_adam import adam_step, available

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01


def timed(fn, steps: int) -> float:
    fn()  # warm-up (allocations, first touch of the state)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(fns: dict, steps: int) -> dict[str, float]:
    """Median seconds of each function, calling them in turn so that the machine's drift (this
    2-core machine varies by +-20% from one minute to the next) hits all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--steps", type=int, default=9)
    args = ap.parse_args(argv)
    if not available():
        print("the C++ kernel cannot be built here", file=sys.stderr)
        return 1
    n = int(args.params)
    torch.manual_seed(0)
    info = machine()
    a, b, c = torch.randn(n), torch.randn(n), torch.empty(n)   # a STREAM-style add: 12 bytes per element
    copy_bw = 12 * n / timed(lambda: torch.add(a, b, out=c), args.steps)
    del a, b, c

    for grad_dtype in (torch.bfloat16, torch.float32):
        tag = "bf16" if grad_dtype == torch.bfloat16 else "fp32"
        work = torch.empty(n, dtype=torch.bfloat16)
        grad = (torch.randn(n) * 1e-3).to(grad_dtype)
        p, m, v = torch.randn(n), torch.zeros(n), torch.zeros(n)
        step = [0]

        def cpp():  # one pass: gradient in, master + moments updated, working copy out
            step[0] += 1
            adam_step(p, grad, m, v, work, lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD,
                      adamw=True, step=step[0])

        fns = {"loom_cpu_adam": cpp}
        keep = []
        for name, kw in (("torch_adamw_fused", {"fused": True}), ("torch_adamw_foreach", {"foreach": True})):
            master = torch.nn.Parameter(torch.randn(n))
            master.grad = grad if grad_dtype == torch.float32 else torch.empty(n)
            opt = torch.optim.AdamW([master], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw)
            keep.append((master, opt))

            def torch_step(master=master, opt=opt):  # fp32 gradients in, no working copy written
                if master.grad is not grad:
                    master.grad.copy_(grad)
                opt.step()
                work.copy_(master.detach())

            fns[name] = torch_step
        results = interleaved(fns, args.steps)
        del keep, fns, p, m, v
        bytes_per_param = 4 * 3 + grad.element_size() + 4 * 3 + 2   # read p, m, v, g; write p, m, v, copy
        adam_bw = bytes_per_param * n / results["loom_cpu_adam"]
        for name, seconds in results.items():
            print(json.dumps({"name": f"{name}_step_seconds_{tag}_grads", "value": seconds, "unit": "s",
                              "baseline": None, "params": n, "machine": info}))
        suffix = "" if tag == "bf16" else "_fp32_grads"
        print(json.dumps({"name": f"cpu_adam_speedup_vs_torch_fused{suffix}",
                          "value": results["torch_adamw_fused"] / results["loom_cpu_adam"], "unit": "x",
                          "baseline": f"torch.optim.AdamW(fused=True) on {tag} gradients (upcast if bf16), then the bf16 copy",
                          "target": 1.5 if tag == "bf16" else None, "params": n, "machine": info}))
        print(json.dumps({"name": f"cpu_adam_speedup_vs_torch_foreach{suffix}",
                          "value": results["torch_adamw_foreach"] / results["loom_cpu_adam"], "unit": "x",
                          "baseline": f"torch.optim.AdamW(foreach=True) on {tag} gradients (upcast if bf16), then the bf16 copy",
                          "params": n, "machine": info}))
        print(json.dumps({"name": f"cpu_adam_bandwidth_fraction{suffix}", "value": adam_bw / copy_bw,
                          "unit": "fraction", "baseline": "torch.add(a, b, out=c) bandwidth (STREAM add)",
                          "adam_gb_per_s": adam_bw / 1e9, "stream_add_gb_per_s": copy_bw / 1e9, "machine": info}))
        del grad, work
    return 0


if __name__ == "__main__":
    sys.exit(main())

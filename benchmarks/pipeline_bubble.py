"""The pipeline bubble and activation memory of each schedule, measured on real ranks.

    python -m benchmarks.pipeline_bubble            # p = 2, 4; m = 4, 8, 16; GPipe, 1F1B, interleaved (v=2)
    python -m benchmarks.pipeline_bubble --quick    # m = 4, 8 only

Each rank runs a stage of a model of identical layers through the `pipeline` plugin's stage runner
(the same code the GPT app uses). So that the schedule, not this machine's 2 cores shared by up
to 4 ranks, decides the timing, each layer's work is a fixed wait (`--layer-ms` in forward,
twice that in backward) around a small real Linear; activations still flow between the stages
as tensors, through the real point-to-point messages.

Per schedule, p and m, one JSON line with, per stage: the idle fraction of the step (time not
spent in forward or backward), the measured bubble as a fraction of the stage's busy time beside
the formula ((p - 1) / m for GPipe and 1F1B, (p - 1) / (m v) for interleaved), the peak bytes of
activations saved for backward, and how many micro-batches' activations that is (1F1B: at most
p on the first stage; GPipe: m; the last stage also keeps its loss's input, half a layer's worth
per micro-batch here).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from benchmarks._machine import machine

WIDTH, SEQ, MB = 64, 32, 4          # activation of one micro-batch: MB x SEQ x WIDTH fp32


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        time.sleep(2 * ctx.seconds)
        return g, None


class _Layer(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.seconds = seconds

    def forward(self, x):
        return _Wait.apply(self.fc(x), self.seconds)


class _Model(nn.Module):
    def __init__(self, layers: int, seconds: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(seconds) for _ in range(layers))

    def pipeline_layers(self):
        from core.pipeline import PipelineLayer

        return [PipelineLayer(f"layer{i}", (f"layers.{i}",), layer) for i, layer in enumerate(self.layers)]


def run_stage(p: int, configs: list[tuple[str, int, int]], layer_ms: float) -> list[dict]:
    """On each of p ranks: for every (schedule, m, v), a warm-up step and a measured step."""
    import torch.distributed as dist

    from core.booster import PipelinePlugin
    from core.distributed import Layout, ParallelMesh

    mesh = ParallelMesh.build(Layout(pp=p))
    out = []
    for schedule, m, v in configs:
        torch.manual_seed(0)
        model = _Model(2 * p, layer_ms / 1000)      # the same model for every schedule: 2 layers per rank
        plugin = PipelinePlugin(mesh, "fp32", schedule, m, v)
        wrapped, opt = plugin.configure(model, torch.optim.SGD(model.parameters(), lr=0.0))
        batches = [torch.randn(MB, SEQ, WIDTH) for _ in range(m)]
        for step in range(2):
            plugin.keep_records = step == 1
            dist.barrier()
            t0 = time.perf_counter()
            plugin.execute_pipeline(batches, wrapped, lambda b: b, lambda y, b: y.square().mean(), opt)
            t1 = time.perf_counter()
            opt.zero_grad()
        record = plugin.records[-1]
        busy = sum(e - s for _, _, _, s, e in record.spans)
        out.append({"schedule": schedule, "m": m, "v": v, "step_s": t1 - t0, "busy_s": busy,
                    "peak_activation_bytes": record.peak_activation_bytes, "peak_held": record.peak_held})
    return out


def main(argv: list[str] | None = None) -> int:
    from core.distributed.testing import run_distributed

    ap = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_bubble", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="m = 4 and 8 only")
    ap.add_argument("--layer-ms", type=float, default=20.0, help="forward wait per layer (backward: twice)")
    args = ap.parse_args(argv)
    print(json.dumps({"name": "machine", **machine()}), flush=True)
    micro = (4, 8) if args.quick else (4, 8, 16)
    per_micro = MB * SEQ * WIDTH * 4           # a Linear's saved input, per layer and micro-batch (2 layers a rank)
    worst = 0.0
    for p in (2, 4):
        configs = [(s, m, v) for s, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)) for m in micro]
        ranks = run_distributed(run_stage, world_size=p, args=(p, configs, args.layer_ms), timeout=900)
        for k, (schedule, m, v) in enumerate(configs):
            stages = [r[k] for r in ranks]
            step = max(st["step_s"] for st in stages)
            formula = (p - 1) / (m * v)
            measured = [(step - st["busy_s"]) / st["busy_s"] for st in stages]
            worst = max(worst, max(abs(x - formula) for x in measured))
            print(json.dumps({
                "name": "pipeline_bubble", "schedule": schedule, "p": p, "m": m, "v": v,
                "layer_ms": args.layer_ms, "step_s": round(step, 4),
                "idle_fraction": [round((step - st["busy_s"]) / step, 4) for st in stages],
                "bubble": [round(x, 4) for x in measured], "formula": round(formula, 4),
                "peak_activation_kib": [round(st["peak_activation_bytes"] / 1024, 1) for st in stages],
                "microbatches_held": [st["peak_activation_bytes"] / (2 * per_micro) for st in stages],
            }), flush=True)
    print(json.dumps({"name": "pipeline_bubble_max_error", "value": round(worst, 4),
                      "unit": "bubble fraction, measured minus formula"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

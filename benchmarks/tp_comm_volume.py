"""What each tensor-parallel mode communicates per rank for one transformer layer: measured, and
as the cost model (`core.tensor.cost`) predicts it.

    python -m benchmarks.tp_comm_volume            # measured on gloo ranks + the model at GPT-3 scale
    python -m benchmarks.tp_comm_volume --quick    # smaller measured layer

1. Measured: one training step (forward and backward, input gradient included) of one GPT block
   (`apps.gpt.model.Block`) in each mode on gloo ranks of this machine (1D on 4 and 8, 2D on 4,
   2.5D on 8 as 2 x 2 x 2, 3D on 8), counting every collective through `core.distributed`'s
   counters, beside the cost model's calls and bytes for the same shape. One JSON line per mode:
   `ratio` = measured / predicted bytes (the target is within 5 %).
2. Modelled: the per-device volume of one layer at a GPT-3-like shape (hidden 12288, sequence
   2048, 512 sequences per tensor-parallel group, fp16) for p = 8, 64, 512 and 4096 in each mode
   that p fits (2.5D: of the depths 2 <= d <= q, the one that minimises the wire bytes, since a
   deeper grid replicates the weights d times: `weight_share` is the fraction of a layer's
   weights each device holds), as the payload handed to the collectives and as the bytes a rank
   puts on the wire with ring algorithms; `vs_1d` compares wire bytes with 1D at the same p.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks._machine import machine
from core.tensor.cost import grid, transformer_layer

MEASURED = [("1d", 4, 1), ("1d", 8, 1), ("2d", 4, 1), ("2.5d", 8, 2), ("3d", 8, 1)]
GPT3 = {"batch": 512, "seq": 2048, "hidden": 12288, "dtype_bytes": 2}


def measure_layer(mode_name: str, tp: int, depth: int, batch: int, seq: int, hidden: int, heads: int,
                  bias: bool = True) -> dict:
    """On each of `tp` ranks: the calls and bytes one block's forward and backward handed to the
    collectives (run it under torchrun or `core.distributed.testing.run_distributed`)."""
    from apps.gpt.config import GPTModelConfig
    from apps.gpt.model import Block
    from core.distributed import Layout, ParallelMesh
    from core.tensor import make_mode

    mesh = ParallelMesh.build(Layout(tp=tp))
    mode = make_mode(mode_name, mesh, depth)
    cfg = GPTModelConfig(n_layer=1, n_head=heads, d_model=hidden, seq_len=seq, vocab_size=8, bias=bias)
    torch.manual_seed(0)
    block = Block(cfg, mode)
    x = torch.randn(batch, seq, hidden)
    with torch.no_grad():
        x = mode.split_input(x)
    x.requires_grad_(True)                     # a layer inside a network: its input gradient too
    mesh.stats.reset()
    block(x).square().mean().backward()
    return {"calls": mesh.stats.calls("tp"), "bytes": mesh.stats.bytes("tp"), "by_axis": mesh.stats.as_dict()}


def measured_lines(quick: bool) -> list[dict]:
    from core.distributed.testing import run_distributed

    batch, seq, hidden, heads = (8, 16, 32, 8) if quick else (8, 64, 128, 8)
    lines = []
    for mode, tp, depth in MEASURED:
        got = run_distributed(measure_layer, world_size=tp, args=(mode, tp, depth, batch, seq, hidden, heads))
        predicted = transformer_layer(mode, tp, batch, seq, hidden, 4, depth)
        worst = max(got, key=lambda r: abs(r["bytes"] - predicted.payload_bytes))
        lines.append({"name": "tp_comm_measured", "mode": mode, "p": tp, "depth": depth,
                      "shape": {"batch": batch, "seq": seq, "hidden": hidden, "dtype": "fp32"},
                      "calls": worst["calls"], "predicted_calls": predicted.calls,
                      "bytes": worst["bytes"], "predicted_bytes": int(predicted.payload_bytes),
                      "ratio": round(worst["bytes"] / predicted.payload_bytes, 6),
                      "ranks_agree": all(r["bytes"] == got[0]["bytes"] for r in got)})
    return lines


def modelled_lines() -> list[dict]:
    lines = []
    for p in (8, 64, 512, 4096):
        one_d = transformer_layer("1d", p, **GPT3)
        for mode in ("1d", "2d", "2.5d", "3d"):
            options = []
            for depth in ([1] if mode != "2.5d" else [d for d in range(2, p + 1) if p % d == 0]):
                try:
                    q, d = grid(mode, p, depth)
                except ValueError:
                    continue
                if mode == "2.5d" and not 2 <= d <= q:
                    continue
                options.append((transformer_layer(mode, p, depth=depth, **GPT3), q, d))
            if not options:
                lines.append({"name": "tp_comm_model", "mode": mode, "p": p, "fits": False})
                continue
            cost, q, d = min(options, key=lambda o: o[0].wire_bytes)
            lines.append({"name": "tp_comm_model", "mode": mode, "p": p, "fits": True, "q": q, "depth": d,
                          "shape": GPT3, "calls": cost.calls,
                          "weight_share": f"1/{p // d}",
                          "payload_gib": round(cost.payload_bytes / 2 ** 30, 4),
                          "wire_gib": round(cost.wire_bytes / 2 ** 30, 4),
                          "vs_1d": round(cost.wire_bytes / one_d.wire_bytes, 4)})
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tp_comm_volume", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller measured layer")
    args = ap.parse_args(argv)
    print(json.dumps({"name": "machine", **machine()}), flush=True)
    worst = 0.0
    for line in measured_lines(args.quick):
        worst = max(worst, abs(line["ratio"] - 1))
        print(json.dumps(line), flush=True)
    for line in modelled_lines():
        print(json.dumps(line), flush=True)
    print(json.dumps({"name": "tp_comm_model_error", "value": worst, "target": 0.05}), flush=True)
    return 0 if worst <= 0.05 else 1


if __name__ == "__main__":
    raise SystemExit(main())

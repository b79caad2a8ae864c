"""Peak memory of one Stable Diffusion v1.5 fine-tuning step: plain diffusers-style loop vs Loom.

A UNet with the SD v1.5 architecture (about 860 M parameters, random weights) takes one training
step on 64x64 latents, batch 1, text states of 77 x 768. Each variant runs in a fresh process
and reports its peak resident memory (ru_maxrss):

- plain: what diffusers' train_text_to_image.py does by default: fp32 weights and compute,
  torch.optim.AdamW (foreach), no gradient checkpointing.
- loom: Loom's smallest-memory recipe available today: the UNet's gradient checkpointing,
  mixed precision (bf16 autocast over fp32 master weights; `--precision`), and AdamW without
  foreach (no full-size temporaries). ZeRO and CPU/NVMe offload (the heterogeneous-memory work)
  will lower this further. On a CPU without bf16 instructions (no AVX512-BF16 / AMX) bf16 is
  emulated and one step takes tens of minutes, so there the default is fp32.

    python -m benchmarks.diffusion_finetune_memory [--size 64] [--precision auto|bf16|fp32]

Prints JSON lines with the peak of each and {"name": "sd15_finetune_peak_memory_ratio",
"value": plain / loom}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def one_step(variant: str, size: int, precision: str) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    params = sum(p.numel() for p in unet.parameters())
    latents = torch.randn(1, 4, size, size)
    text = torch.randn(1, 77, 768)
    t = torch.tensor([500])
    noise = torch.randn_like(latents)
    if variant == "plain":
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
        autocast = torch.autocast("cpu", enabled=False)
    else:
        unet.enable_gradient_checkpointing()
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, foreach=False)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    unet.train()
    start = time.perf_counter()
    with autocast:
        pred = unet(latents + noise, t, text).sample
    loss = F.mse_loss(pred.float(), noise)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "params": params, "peak_bytes": peak_kib * 1024, "step_seconds": seconds,
            "loss": float(loss), "precision": "fp32" if variant == "plain" else precision}


def cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="latent height and width")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="Loom variant's compute precision; auto = bf16 where the CPU has bf16 instructions")
    ap.add_argument("--child", choices=("plain", "loom"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.precision == "auto":
        args.precision = "bf16" if cpu_has_bf16() else "fp32"
    if args.child:
        print(json.dumps(one_step(args.child, args.size, args.precision)))
        return 0
    from benchmarks._machine import machine

    results = {}
    for variant in ("plain", "loom"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.diffusion_finetune_memory", "--child", variant,
                              "--size", str(args.size), "--precision", args.precision],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(json.dumps({"name": f"sd15_finetune_peak_memory_{variant}", "value": r["peak_bytes"] / 2**30,
                          "unit": "GiB", "baseline": None, "params": r["params"],
                          "step_seconds": round(r["step_seconds"], 1), "latent_size": args.size,
                          "precision": r["precision"],
                          "machine": machine()}))
    ratio = results["plain"]["peak_bytes"] / results["loom"]["peak_bytes"]
    print(json.dumps({"name": "sd15_finetune_peak_memory_ratio", "value": ratio, "unit": "x",
                      "baseline": "plain diffusers-style fp32 AdamW step", "target_after_memory_issue": 5.6,
                      "loom_recipe": f"gradient checkpointing + {args.precision} + AdamW(foreach=False)",
                      "machine": machine()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tuning Stable Diffusion v1.5 at 512 px: diffusers' plain training step vs Loom's diffusion app.

The model is a Stable Diffusion v1.5-architecture pipeline with random weights (UNet 859.5 M, VAE
83.7 M, CLIP text encoder 123.1 M parameters), built here with diffusers' and transformers' classes
and cached; the data are 8 captioned 512 px images of the built-in shapes set. Each variant runs in
a fresh process, batch 1, for `--steps` steps:

- plain: what diffusers' train_text_to_image.py does by default: fp32 weights and compute,
  torch.optim.AdamW, no gradient checkpointing (for LoRA: peft adapters on the frozen UNet, AdamW
  on the adapters).
- loom: `python -m apps.diffusion.finetune --recipe diffusion/sd15-finetune-8gb` (LoRA:
  `diffusion/sd15-lora-8gb`) on the same folder
  (Loom's own code path: gradient checkpointing through the session's recompute, the UNet in 64 MB
  chunks within `memory.device_gb`, optimizer states, gradients and the EMA on NVMe for full
  fine-tuning, frozen weights without optimizer state), validation off, precision bf16 where the
  CPU has bf16 instructions and fp32 where it would be emulated (tens of minutes a step).

For each it prints the peak memory of the training steps (forward, backward, optimizer step and
EMA update; model loading, the final checkpoint and the export are outside it; on a GPU
`torch.cuda.max_memory_allocated`, on a CPU-only machine the resident set's high-water mark, since
host memory is the device there), the process's whole-life peak resident set, bytes on disk, and
seconds per step; then `sd15_finetune_peak_memory_ratio` (plain / Loom, full fine-tuning) and the
same for LoRA.

    python -m benchmarks.diffusion_finetune_memory [--methods full,lora] [--steps 2] [--device-gb 0.5]

About 25 minutes on 2 CPU cores, 16 GB of memory for the plain variant and 25 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
CLIP_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
RESOLUTION = 512
RECIPES = {"full": "diffusion/sd15-finetune-8gb", "lora": "diffusion/sd15-lora-8gb"}
IMAGES = 8
VERSION = 1


def sd15_folder(cache: Path) -> Path:
    """The random-weight SD v1.5-architecture pipeline folder (built once, atomically)."""
    folder = cache / f"sd15-random-v{VERSION}"
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from apps.diffusion.shapes import WORDS
    from apps.diffusion.tokenizer import write_clip_tokenizer

    print(f"building the SD v1.5-architecture pipeline (random weights) in {folder} (once)", file=sys.stderr)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp / "_vocab", WORDS)), model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(**SD15_VAE)
    unet = UNet2DConditionModel(**SD15_UNET)
    train = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(train.config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp)
    shutil.rmtree(tmp / "_vocab")
    os.replace(tmp, folder)
    return folder


# --------------------------------------------------------------------------------------------
# The plain variant (a child process)
# --------------------------------------------------------------------------------------------

def plain_steps(folder: Path, data: Path, method: str, steps: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from apps.diffusion.model import add_lora, load_parts, tokenize
    from core.memory.usage import peak_bytes, reset_peak

    cpu = torch.device("cpu")
    parts = load_parts(folder)
    parts.vae.requires_grad_(False).eval()
    parts.text_encoder.requires_grad_(False).eval()
    if method == "lora":
        add_lora(parts.unet, 4, 4.0)
    parts.unet.train()
    opt = torch.optim.AdamW([p for p in parts.unet.parameters() if p.requires_grad], lr=1e-5)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line]
    peak, seconds = 0, []
    for step in range(steps):
        row = rows[step % len(rows)]
        with Image.open(data / row["file_name"]) as im:
            pixels = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        ids = tokenize(parts.tokenizer, [row["text"]])
        reset_peak(cpu)
        t0 = time.perf_counter()
        with torch.no_grad():
            latents = parts.vae.encode(pixels[None]).latent_dist.sample() * parts.vae.config.scaling_factor
            context = parts.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,))
        pred = parts.unet(parts.scheduler.add_noise(latents, noise, t), t, context).sample
        F.mse_loss(pred.float(), noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        peak = max(peak, peak_bytes(cpu))
    return {"step_peak_bytes": peak, "seconds_per_step": seconds}


# --------------------------------------------------------------------------------------------
# Running the variants
# --------------------------------------------------------------------------------------------

class _Popen(subprocess.Popen):
    """A Popen that reaps its process with wait4 and keeps that process's ru_maxrss."""

    def _try_wait(self, wait_flags):
        try:
            pid, status, usage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            return self.pid, 0
        if pid == self.pid:
            self.loom_maxrss = usage.ru_maxrss * 1024
        return pid, status


def run_variant(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, int, float]:
    start = time.perf_counter()
    proc = _Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    return done, getattr(proc, "loom_maxrss", 0), time.perf_counter() - start


def _loom(cmd: list[str], env: dict, out: Path, method: str) -> dict | None:
    """Run the app; its step peak, whole-life peak, NVMe bytes and seconds per step (last step)."""
    done, life_peak, _ = run_variant(cmd, env)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return None
    peak = re.search(r"peak (?:resident|device) memory in the steps ([0-9.]+) GiB", done.stderr)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [row["images_per_s"] for row in rows if "images_per_s" in row]
    disk = re.search(r"NVMe ([0-9.]+) (GiB|MiB|KiB)", done.stderr)
    nvme = float(disk.group(1)) * {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10}[disk.group(2)] if disk else 0
    return {"step_peak": float(peak.group(1)) * 2**30, "life_peak": life_peak, "disk": nvme,
            "seconds_per_step": 1.0 / rates[-1] if rates else None,
            "exported": str(out / ("lora" if method == "lora" else "pipeline"))}


def _export_loads(folder: Path, method: str) -> bool:
    """The run's export opens as diffusers opens it (the pipeline; LoRA: its weights file)."""
    if method == "lora":
        from safetensors.torch import load_file

        return len(load_file(str(folder / "pytorch_lora_weights.safetensors"))) > 0
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    return sum(p.numel() for p in pipe.unet.parameters()) > 800e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="full,lora", help="full, lora or both (comma-separated)")
    ap.add_argument("--steps", type=int, default=2, help="training steps per variant")
    ap.add_argument("--device-gb", type=float, default=0.5, help="Loom's memory.device_gb on a CPU-only machine")
    ap.add_argument("--work", default="", help="folder for the runs (default: a folder in the cache)")
    ap.add_argument("--keep", action="store_true", help="keep each run's output folder (checkpoints, export)")
    ap.add_argument("--child", choices=("plain",), help=argparse.SUPPRESS)
    ap.add_argument("--method", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--folder", default="", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(plain_steps(Path(args.folder), Path(args.data), args.method, args.steps)))
        return 0

    import torch

    from apps.diffusion import shapes
    from benchmarks._machine import machine
    from core.cache import cache_dir

    cache = cache_dir() / "diffusion"
    folder = sd15_folder(cache)
    data = cache / f"shapes-v1-{IMAGES}-{RESOLUTION}px-bench"
    if not (data / "metadata.jsonl").is_file():
        shapes.generate(data, IMAGES, RESOLUTION, 0)
    work = Path(args.work) if args.work else cache / "sd15-bench-runs"
    work.mkdir(parents=True, exist_ok=True)
    bf16 = torch.cuda.is_available() or "avx512_bf16" in Path("/proc/cpuinfo").read_text() \
        or "amx_bf16" in Path("/proc/cpuinfo").read_text()
    precision = "bf16" if bf16 else "fp32"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    ratios = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        found = {}
        plain_cmd = [sys.executable, "-m", "benchmarks.diffusion_finetune_memory", "--child", "plain", "--method",
                     method, "--folder", str(folder), "--data", str(data), "--steps", str(args.steps)]
        done, life_peak, wall = run_variant(plain_cmd, env)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode or 1
        r = json.loads(done.stdout.strip().splitlines()[-1])
        found["plain"] = {"step_peak": r["step_peak_bytes"], "life_peak": life_peak, "disk": 0,
                          "seconds_per_step": r["seconds_per_step"][-1]}
        print(f"plain {method}: step peak {r['step_peak_bytes'] / 2**30:.2f} GiB, {r['seconds_per_step']} s per step",
              file=sys.stderr, flush=True)
        base = [sys.executable, "-m", "apps.diffusion.finetune", "--recipe", RECIPES[method],
                f"model.pretrained={folder}", f"data.path={data}", f"data.resolution={RESOLUTION}",
                f"train.steps={args.steps}", "train.grad_accum=1", "validation.prompts=[]", "train.progress=false",
                "train.log_every=1", f"parallel.precision={precision}", "output.overwrite=true", "data.num_workers=0"]
        if not torch.cuda.is_available():
            # host memory is the device here: offloading to it would offload nothing, so the
            # states and the frozen weights go to the disk
            base += ["parallel.device=cpu", f"memory.device_gb={args.device_gb}", "parallel.offload=nvme"]
        variants = {"loom": [], "loom_in_memory": ["parallel.offload=none", "memory.device_gb=0"]}
        for variant, extra in variants.items():
            out = work / f"{variant}-{method}"
            result = _loom(base + [f"output.dir={out}", f"memory.nvme_dir={out / 'nvme'}"] + extra, env, out, method)
            if result is None:
                return 1
            result["export_loads"] = _export_loads(Path(result["exported"]), method)
            if not args.keep:                     # checkpoints of SD v1.5 with its optimizer states: ~14 GB
                shutil.rmtree(out, ignore_errors=True)
            found[variant] = result
            print(f"{variant} {method}: step peak {result['step_peak'] / 2**30:.2f} GiB, "
                  f"{result['seconds_per_step']} s per step", file=sys.stderr, flush=True)
        for variant, f in found.items():
            print(json.dumps({"name": f"sd15_{method}_step_peak_memory_{variant}", "value": f["step_peak"] / 2**30,
                              "unit": "GiB", "baseline": None, "process_life_peak_gib": f["life_peak"] / 2**30,
                              "disk_gib": f["disk"] / 2**30, "seconds_per_step": f["seconds_per_step"],
                              "export_loads": f.get("export_loads"),
                              "precision": "fp32" if variant == "plain" else precision,
                              "resolution": RESOLUTION, "steps": args.steps, "machine": machine()}), flush=True)
        print(json.dumps({"name": f"sd15_{method}_offload_time_ratio",
                          "value": found["loom"]["seconds_per_step"] / found["loom_in_memory"]["seconds_per_step"],
                          "unit": "x", "baseline": "the same app and recipe with everything in memory",
                          "target": 1.5, "machine": machine()}), flush=True)
        ratios[method] = found["plain"]["step_peak"] / found["loom"]["step_peak"]
        name = "sd15_finetune_peak_memory_ratio" if method == "full" else f"sd15_{method}_peak_memory_ratio"
        print(json.dumps({"name": name, "value": ratios[method], "unit": "x",
                          "baseline": "plain diffusers-style fp32 AdamW step, no checkpointing",
                          "target": 5.6 if method == "full" else None,
                          "loom_recipe": RECIPES[method], "machine": machine()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How far a bfloat16 pair representation moves AlphaFold's atoms, and what it saves.

    python -m benchmarks.protein_pair_precision                 # about 2 minutes on 2 CPU cores
    python -m benchmarks.protein_pair_precision --length 256

One model (AlphaFold model_1's channels: c_m 256, c_z 128; 2 Evoformer blocks, 1 extra-MSA block,
8 structure-module iterations, one recycle), folded three ways on the same input in one process:
fp32 throughout; `model.pair_dtype=bfloat16` (z and the stacks' pair-sized buffers in bfloat16,
the weights and the arithmetic in fp32); `model.dtype=bfloat16` (everything in bfloat16).

OpenFold initialises every residual output layer to zero, so with its initial weights the blocks
change nothing and any precision would agree: the weights get Gaussian noise first (scale
--noise, on every weight), as the parity tests do. The input is a generated sequence with a
generated MSA of --msa-rows mutated copies (30% of positions resampled).

Prints JSON lines: per variant the fold's peak (the most resident memory during the fold less what
the process held when it began) and the all-atom and C-alpha RMSD from fp32 in Angstrom
(`protein_pair_bf16_rmsd`, `protein_model_bf16_rmsd`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._machine import machine

GIB = 1 << 30
LETTERS = "ACDEFGHIKLMNPQRSTVWY"


def _inputs(length: int, rows: int, folder: Path):
    """A FASTA target of `length` residues and an .a3m of `rows` mutated copies, in `folder`."""
    from apps.protein.fasta import parse_fasta

    rng = random.Random(length)
    seq = "".join(rng.choice(LETTERS) for _ in range(length))
    hits = [">query", seq]
    for k in range(rows):
        hits += [f">hit{k}", "".join(rng.choice(LETTERS) if rng.random() < 0.3 else a for a in seq)]
    (folder / "t").mkdir(parents=True)
    (folder / "t" / "hits.a3m").write_text("\n".join(hits) + "\n")
    return parse_fasta(f">t\n{seq}\n")[0]


def _fold(overrides: dict, target, alignments: Path, noise: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The final atom positions, which atoms exist, and the fold's peak in GiB."""
    from apps.protein.config import ProteinRecipe
    from apps.protein.model import build_model, features, openfold_config
    from core.config import load_recipe
    from core.memory.usage import peak_bytes, process_bytes, reset_peak

    cfg = load_recipe(ProteinRecipe, "protein/demo")
    cfg.model.evoformer_blocks, cfg.model.extra_msa_blocks, cfg.model.structure_blocks = 2, 1, 0
    cfg.model.recycles = 1
    cfg.data.max_msa_clusters, cfg.data.max_extra_msa = 16, 16
    for key, value in overrides.items():
        setattr(cfg.model, key, value)
    config = openfold_config(cfg)
    torch.manual_seed(0)
    np.random.seed(0)
    model = build_model(cfg, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * noise).to(p.dtype))
    np.random.seed(0)                                        # OpenFold samples the MSA clusters
    batch = features(target, config, str(alignments))
    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    cpu = torch.device("cpu")
    reset_peak(cpu)
    held = process_bytes(cpu)
    with torch.no_grad():
        out = model(inputs)
    peak = (peak_bytes(cpu) - held) / GIB
    return out["final_atom_positions"].float(), batch["atom37_atom_exists"][..., -1].bool(), peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=128, help="residues")
    ap.add_argument("--msa-rows", type=int, default=8, help="rows of the generated MSA besides the query")
    ap.add_argument("--noise", type=float, default=0.02, help="scale of the Gaussian noise on every weight")
    args = ap.parse_args(argv)
    print(json.dumps({"name": "machine", **machine()}), flush=True)
    from core.memory.store import return_freed_buffers_to_the_os

    return_freed_buffers_to_the_os()
    folder = Path(tempfile.mkdtemp(prefix="loom-precision-"))
    target = _inputs(args.length, args.msa_rows, folder)
    runs = {}
    variants = (("fp32", {}), ("pair_bf16", {"pair_dtype": "bfloat16"}), ("model_bf16", {"dtype": "bfloat16"}))
    for name, overrides in variants:
        t = time.perf_counter()
        runs[name] = _fold(overrides, target, folder, args.noise)
        print(json.dumps({"name": "protein_fold", "variant": name, "length": args.length,
                          "fold_peak_gib": round(runs[name][2], 4), "seconds": round(time.perf_counter() - t, 1)}),
              flush=True)
    ref, exists, ref_peak = runs["fp32"]
    ca = torch.zeros_like(exists)
    ca[:, 1] = exists[:, 1]                                  # atom37's index 1 is C-alpha
    for name in ("pair_bf16", "model_bf16"):
        pos, _, peak = runs[name]
        diff = (pos - ref).pow(2).sum(-1)
        print(json.dumps({"name": f"protein_{name}_rmsd", "value": round(diff[exists].mean().sqrt().item(), 4),
                          "unit": "Angstrom (all atoms, from fp32)",
                          "ca_rmsd": round(diff[ca].mean().sqrt().item(), 4),
                          "max_deviation": round(diff[exists].sqrt().max().item(), 4),
                          "fold_peak_ratio": round(peak / ref_peak, 3), "length": args.length,
                          "spread": round(ref[exists].std().item(), 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

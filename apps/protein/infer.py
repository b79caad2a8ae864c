"""Fold every record of a FASTA file with OpenFold's AlphaFold.

    python -m apps.protein.infer                                    # the bundled demo, small random model
    python -m apps.protein.infer data.fasta=my.fasta model.params=params_model_1.npz \\
        model.evoformer_blocks=0 model.extra_msa_blocks=0 model.structure_blocks=0 model.recycles=3

Per target, in `output.dir/<name>/`: `<name>.pdb` (pLDDT in the B-factor column; `.cif` too with
output.mmcif=true), `plddt.png` (and the predicted aligned error for _ptm presets), and
`timings.json`; a summary table at the end. An output.dir that holds an earlier run's results is
refused before any model is built, unless output.overwrite=true (which replaces them).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from apps.protein.axial import Axial
from apps.protein.compat import load_openfold
from apps.protein.config import ProteinRecipe
from apps.protein.evoformer import Stack
from apps.protein.fasta import read_fasta
from apps.protein.model import build_model, features, openfold_config, read_alignments
from apps.protein.plan import GIB
from core import cli
from core.distributed import ParallelMesh, failure, launch
from core.errors import LoomError
from core.run_folder import refuse_earlier_run
from core.memory.store import return_freed_buffers_to_the_os
from core.memory.usage import peak_bytes, process_bytes, reset_peak

SUMMARY = "Protein structure prediction on OpenFold's AlphaFold: every FASTA record is a target."
RANDOM_WEIGHTS = ("note: model.params is empty, so the model has random weights and its structures are not "
                  "predictions; pass AlphaFold weights (model.params=params_model_1.npz, from "
                  "https://github.com/deepmind/alphafold) or an OpenFold .pt checkpoint, with the preset's "
                  "block counts (model.evoformer_blocks=0 model.extra_msa_blocks=0 model.structure_blocks=0)")


def _plot(path: Path, name: str, plddt: np.ndarray, pae: np.ndarray | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if pae is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(np.arange(1, len(plddt) + 1), plddt, lw=1.2)
    ax.set(xlabel="residue", ylabel="pLDDT", ylim=(0, 100), title=f"{name}: mean pLDDT {plddt.mean():.1f}")
    for level in (50, 70, 90):
        ax.axhline(level, color="grey", lw=0.5, ls=":")
    if pae is not None:
        im = axes[0][1].imshow(pae, cmap="Greens_r", vmin=0)
        axes[0][1].set(title="predicted aligned error (A)", xlabel="scored residue", ylabel="aligned residue")
        fig.colorbar(im, ax=axes[0][1])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_mmcif(pdb_path: Path, cif_path: Path) -> None:
    from Bio.PDB import MMCIFIO, PDBParser

    structure = PDBParser(QUIET=True).get_structure(pdb_path.stem, str(pdb_path))
    io = MMCIFIO()
    io.set_structure(structure)
    io.save(str(cif_path))


def _result_files(folder: Path) -> list[Path]:
    """What `_predict` writes for one target into its folder `output.dir/<name>/`."""
    return [folder / f"{folder.name}.pdb", folder / f"{folder.name}.cif", folder / "plddt.png",
            folder / "timings.json"]


def _earlier_results(root: Path) -> list[Path]:
    """The target folders of `root` that hold an earlier run's results (a `<name>.pdb` or a
    `timings.json`), sorted; [] when `root` does not exist."""
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir()
                  if d.is_dir() and ((d / f"{d.name}.pdb").is_file() or (d / "timings.json").is_file()))


def _staging(root: Path, name: str) -> Path:
    """Where one target's files are written before they appear in `output.dir/<name>/`, so a run
    stopped mid-target never leaves a folder that looks finished."""
    return root / f".{name}.partial"


def _publish(staging: Path, folder: Path) -> None:
    """Move a target's finished files from `staging` into `folder`: the whole folder in one rename
    where it does not exist yet, else file by file (each replace atomic), timings.json last."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    for f in sorted(staging.iterdir(), key=lambda f: f.name == "timings.json"):
        os.replace(f, folder / f.name)
    staging.rmdir()


def _remove_results(folders: list[Path]) -> None:
    """Delete the files an earlier run wrote into these target folders, and each folder it leaves
    empty (anything else a person put there stays)."""
    for folder in folders:
        for f in _result_files(folder):
            f.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()


def _refuse_earlier_results(root: Path, overwrite: bool, main: bool, ax: Axial) -> list[Path]:
    """The earlier run's target folders that this run replaces (on rank 0, which alone writes);
    a `LoomError` on every rank, decided by rank 0, when there are some and overwrite is off."""
    earlier = _earlier_results(root) if main else []
    refuse = bool(earlier) and not overwrite
    if ax.size > 1:
        shared = [refuse]
        torch.distributed.broadcast_object_list(shared, src=0)
        refuse = shared[0]
    if refuse:
        names = ", ".join(d.name for d in earlier[:3]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
        refuse_earlier_run(root, False, f"target folders: {names}", what="results", resumable=False)
    return earlier


def _spilled(model: torch.nn.Module) -> int:
    """Bytes Loom's stacks have written to memory.spill_dir so far."""
    return sum(m.spilled_bytes for m in model.modules() if isinstance(m, Stack))


def predict(cfg: ProteinRecipe) -> list[dict]:
    """Fold every target; returns one summary row per target (on rank 0; [] on the others)."""
    p = cfg.parallel
    with launch(p.device, p.backend, p.timeout_s) as rt:
        ax = Axial()
        if rt.world_size > 1:
            if cfg.model.engine != "loom":
                raise LoomError(f"{rt.world_size} processes split the Evoformer with axial parallelism, which "
                                f"needs model.engine=loom (model.engine={cfg.model.engine})")
            ax = Axial(ParallelMesh.one_axis("axial", rt.device).axis("axial"))
        if p.auto and rt.is_main:
            print(auto_plan(cfg, rt.world_size), file=sys.stderr)
        return _predict(cfg, rt.device, ax, rt.is_main)


def auto_plan(cfg: ProteinRecipe, world: int) -> str:
    """What `parallel.auto=true` plans here, in one line: nothing is left to choose (the other apps
    pick dp x tp x pp x sp and the rest; this one splits the Evoformer over every process and
    sizes its blocks to the memory)."""
    memory = (f"memory.budget_gb={cfg.memory.budget_gb:g} a process" if cfg.memory.budget_gb
              else "the memory free in each process, less a reserve")
    if cfg.model.engine != "loom":
        return (f"auto-parallel plan for {world} process(es): OpenFold's own stacks on one process "
                f"(model.engine={cfg.model.engine}; model.chunk_size={cfg.model.chunk_size})")
    split = (f"axial parallelism over {world} processes (each a share of the pair representation's rows and "
             f"columns)" if world > 1 else "one process (torchrun --nproc-per-node N splits the Evoformer N ways)")
    return f"auto-parallel plan for {world} process(es): {split}; the Evoformer's blocks sized to {memory}"


def _predict(cfg: ProteinRecipe, device: torch.device, ax: Axial, main: bool) -> list[dict]:
    load_openfold()
    from openfold.np import protein
    from openfold.utils.tensor_utils import tensor_tree_map

    # Every input is read, and the output folder checked, before the model is built.
    targets = read_fasta(cfg.data.fasta)
    for target in targets:
        read_alignments(target, cfg.data.alignments)
    root = Path(cfg.output.dir)
    earlier = _refuse_earlier_results(root, cfg.output.overwrite, main, ax)
    if main and root.is_dir():
        for leftover in root.glob(_staging(root, "*").name):    # a stopped run's unfinished targets
            shutil.rmtree(leftover, ignore_errors=True)
    config = openfold_config(cfg)
    if not cfg.model.params and main:
        print(RANDOM_WEIGHTS, file=sys.stderr)
    if device.type == "cpu":
        # Freed temporaries of 1 MiB or more go back to the OS at once, so that what the block
        # planner reads as this process's memory is what it holds (glibc keeps them otherwise).
        return_freed_buffers_to_the_os()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    np.random.seed(0)                        # OpenFold draws some initial weights with scipy
    model = build_model(cfg, config, ax).to(device)
    dtype = next(model.parameters()).dtype
    build_s = time.perf_counter() - t0
    rows = []
    for target in tqdm(targets, unit="target", disable=len(targets) < 2 or not main, file=sys.stderr):
        folder = root / target.name
        t0 = time.perf_counter()
        batch = features(target, config, cfg.data.alignments)
        if ax.size > 1:                      # OpenFold samples MSA clusters at random: fold rank 0's sample
            shared = [batch]
            torch.distributed.broadcast_object_list(shared, src=0)
            batch = shared[0]
        inputs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}
        t1 = time.perf_counter()
        spilled = _spilled(model)
        reset_peak(device)
        held = process_bytes(device) / GIB          # weights, inputs and the runtime, before the fold
        with torch.no_grad():
            out = model(inputs)
        t2 = time.perf_counter()
        peak = peak_bytes(device) / GIB
        spilled = _spilled(model) - spilled
        if not main:
            continue
        if earlier:                          # output.overwrite=true: the earlier run's results go now
            _remove_results(earlier)
            earlier = []
        staging = _staging(root, target.name)
        staging.mkdir(parents=True)
        feats = {k: v[..., -1].numpy() for k, v in batch.items()}      # the last recycling iteration's
        # Outputs the engine left uncomputed (the loom engine's distogram and TM logits) and the
        # pair representation, which it holds split over the processes, are not written.
        out = {k: v for k, v in out.items() if isinstance(v, (torch.Tensor, dict))}
        result = tensor_tree_map(lambda x: x.float().cpu().numpy(), out)
        plddt = result["plddt"]
        prot = protein.from_prediction(feats, result, b_factors=np.repeat(plddt[:, None], 37, axis=1),
                                       remark=f"Loom / OpenFold {cfg.model.preset}"
                                              + ("" if cfg.model.params else " (random weights)"))
        pdb_path = staging / f"{target.name}.pdb"
        pdb_path.write_text(protein.to_pdb(prot))
        if cfg.output.mmcif:
            _write_mmcif(pdb_path, staging / f"{target.name}.cif")
        _plot(staging / "plddt.png", target.name, plddt, result.get("predicted_aligned_error"))
        timings = {"build_model_s": build_s, "features_s": t1 - t0, "inference_s": t2 - t1,
                   "peak_memory_gib": peak, "held_before_gib": held, "spilled_gib": spilled / GIB,
                   "engine": cfg.model.engine,
                   "processes": ax.size}
        (staging / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        _publish(staging, folder)
        pdb_path = folder / pdb_path.name
        rows.append({"target": target.name, "length": len(target.sequence), "mean_plddt": float(plddt.mean()),
                     "inference_s": t2 - t1, "peak_gib": peak, "pdb": str(pdb_path)})
    if main:
        width = max(len(r["target"]) for r in rows)
        print(f"{'target':<{width}}  length  mean pLDDT  inference  peak memory  pdb")
        for r in rows:
            print(f"{r['target']:<{width}}  {r['length']:>6}  {r['mean_plddt']:>10.1f}  {r['inference_s']:>7.1f} s  "
                  f"{r['peak_gib']:>7.2f} GiB  {r['pdb']}")
    return rows


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse(ProteinRecipe, argv, prog="python -m apps.protein.infer", summary=SUMMARY,
                    default_recipe="protein/demo")
    if cfg is not None:
        predict(cfg)
    return 0


# A stopped run keeps the targets it finished; each target's folder appears only when complete.
STOPPED = failure.Aftermath("the targets finished so far are complete in output.dir",
                            "run the job again with output.overwrite=true")

def console() -> None:
    """The installed command `loom-protein-infer`: `main` with Loom's exit statuses (`core.cli.run_main`)."""
    cli.run_main(main, STOPPED)


if __name__ == "__main__":
    console()

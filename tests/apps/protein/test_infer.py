"""`python -m apps.protein.infer`: the embedded default folds the bundled demo with its outputs;
weights from an OpenFold .pt checkpoint predict exactly what the weights they came from predict;
AlphaFold .npz params that do not fit the preset name what is missing."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.protein.config import ProteinRecipe
from apps.protein.fasta import parse_fasta
from apps.protein.model import build_model, features, openfold_config
from core.config import load_recipe
from core.errors import LoomError
from tests.commands import run_at_once


def _atoms(pdb: Path) -> np.ndarray:
    return np.array([[float(line[30:38]), float(line[38:46]), float(line[46:54])]
                     for line in pdb.read_text().splitlines() if line.startswith("ATOM")])


def test_the_default_folds_the_demo_on_one_and_on_two_processes(tmp_path):
    # two processes split the Evoformer (axial parallelism); rank 0 alone writes, the same atoms
    r, two = run_at_once([[sys.executable, "-m", "apps.protein.infer", f"output.dir={tmp_path}", "output.mmcif=true"],
                          [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "apps.protein.infer", f"output.dir={tmp_path / 'two'}"]], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "random weights" in r.stderr and "model.params=" in r.stderr
    folder = tmp_path / "ubiquitin"
    for name in ("ubiquitin.pdb", "ubiquitin.cif", "plddt.png", "timings.json"):
        assert (folder / name).stat().st_size > 0, name
    atoms = [line for line in (folder / "ubiquitin.pdb").read_text().splitlines() if line.startswith("ATOM")]
    assert len({line[22:26] for line in atoms}) == 76                      # every residue placed
    assert 0 <= float(atoms[0][60:66]) <= 100                               # pLDDT in the B-factor column
    timings = json.loads((folder / "timings.json").read_text())
    assert set(timings) == {"build_model_s", "features_s", "inference_s", "peak_memory_gib", "held_before_gib",
                            "spilled_gib", "engine", "processes"}
    assert 0 < timings["held_before_gib"] < timings["peak_memory_gib"]
    assert timings["spilled_gib"] == 0                                     # nothing spills without a folder
    assert "ubiquitin" in r.stdout and "mean pLDDT" in r.stdout
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("mean pLDDT") == 1 and two.stderr.count("random weights") == 1
    timings = json.loads((tmp_path / "two" / "ubiquitin" / "timings.json").read_text())
    assert timings["processes"] == 2 and timings["engine"] == "loom"
    a, b = _atoms(folder / "ubiquitin.pdb"), _atoms(tmp_path / "two" / "ubiquitin" / "ubiquitin.pdb")
    assert a.shape == b.shape and np.abs(a - b).max() <= 2e-3           # the PDB keeps 3 decimals


def _small(params=""):
    """The demo recipe with OpenFold's own stacks: these tests are about OpenFold's weight formats
    (Loom's stacks take the same state dict: tests/apps/protein/test_loom_evoformer.py)."""
    cfg = load_recipe(ProteinRecipe, "protein/demo")
    cfg.model.params = params
    cfg.model.engine = "openfold"
    return cfg


def test_an_openfold_checkpoint_predicts_like_the_weights_it_holds(tmp_path):
    cfg = _small()
    config = openfold_config(cfg)
    target = parse_fasta(">t\nMKTAYIAKQRQISFVKSHFSRQ\n")[0]
    batch = features(target, config)
    torch.manual_seed(3)
    original = build_model(cfg, config)
    torch.save(original.state_dict(), tmp_path / "weights.pt")
    torch.manual_seed(4)                               # other random weights, then the checkpoint's
    loaded = build_model(_small(str(tmp_path / "weights.pt")), config)
    with torch.no_grad():
        a = original(batch)["final_atom_positions"]
        b = loaded(batch)["final_atom_positions"]
    assert torch.equal(a, b)


def test_params_that_do_not_fit_the_preset_name_the_missing_arrays(tmp_path):
    np.savez(tmp_path / "params_model_1.npz", **{"alphafold/alphafold_iteration/evoformer/preprocess_1d//weights":
                                                 np.zeros((22, 256), dtype=np.float32)})
    cfg = _small(str(tmp_path / "params_model_1.npz"))
    with pytest.raises(LoomError, match=r"does not fit model.preset=model_1: \d+ arrays are missing, e.g. alphafold/"):
        build_model(cfg, openfold_config(cfg))


def _write_alphafold_npz(model, preset, path):
    """The model's weights in AlphaFold's params format: the names OpenFold's importer reads, and
    each array in AlphaFold's own shape (heads and head size apart, (in, out) matrices, blocks
    stacked), by inverting each of the importer's transformations."""
    from openfold.utils import import_weights as iw

    heads, opm = {}, {}
    for module in model.modules():
        if hasattr(module, "no_heads"):
            for child in module.children():
                for p in child.parameters(recurse=False):
                    heads[id(p)] = module.no_heads
        if hasattr(module, "linear_out") and hasattr(module, "c_hidden"):
            opm[id(module.linear_out.weight)] = module.c_hidden

    def inverse(param, kind):
        t = param.detach()
        if kind is iw.ParamType.LinearWeight:
            return t.transpose(-1, -2)
        if kind is iw.ParamType.LinearWeightMHA:
            w = t.transpose(-1, -2)
            return w.reshape(w.shape[0], heads[id(param)], -1)
        if kind is iw.ParamType.LinearMHAOutputWeight:
            w = t.transpose(-1, -2)
            return w.reshape(heads[id(param)], -1, w.shape[-1])
        if kind is iw.ParamType.LinearBiasMHA:
            return t.reshape(heads[id(param)], -1)
        if kind is iw.ParamType.LinearWeightOPM:
            c = opm[id(param)]
            return t.transpose(-1, -2).reshape(c, c, -1)
        return t

    arrays = {}
    for key, param in iw.process_translation_dict(iw.generate_translation_dict(model, preset)).items():
        if param.stacked:
            arrays[key] = torch.stack([inverse(t, param.param_type) for t in param.param]).numpy()
        else:
            arrays[key] = inverse(param.param, param.param_type).numpy()
    np.savez(path, **arrays)
    return arrays


def test_alphafold_params_written_from_a_model_load_and_predict_identically(tmp_path):
    cfg = _small()
    config = openfold_config(cfg)
    batch = features(parse_fasta(">t\nMKTAYIAKQRQISFVKSHFSRQ\n")[0], config)
    torch.manual_seed(5)
    original = build_model(cfg, config)
    arrays = _write_alphafold_npz(original, "model_1", tmp_path / "params_model_1.npz")
    # AlphaFold's own layout, e.g. the first Evoformer block's MSA row attention query: (in, heads, size)
    q = arrays["alphafold/alphafold_iteration/evoformer/evoformer_iteration/msa_row_attention_with_pair_bias/"
               "attention//query_w"]
    assert q.shape == (2, 256, 8, 32)                     # 2 stacked blocks, c_m 256, 8 heads of 32
    torch.manual_seed(6)
    loaded = build_model(_small(str(tmp_path / "params_model_1.npz")), config)
    with torch.no_grad():
        a = original(batch)["final_atom_positions"]
        b = loaded(batch)["final_atom_positions"]
    assert torch.equal(a, b)


def test_axial_parallelism_needs_the_loom_engine_and_openfold_chunking_needs_openfold(tmp_path):
    openfold, chunks, r = run_at_once([
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "apps.protein.infer", "model.engine=openfold", f"output.dir={tmp_path}"],
        [sys.executable, "-m", "apps.protein.infer", "model.chunk_size=4", f"output.dir={tmp_path}"],
        [sys.executable, "-m", "apps.protein.infer", "memory.budget_gb=0.1", f"output.dir={tmp_path}"]])
    assert openfold.returncode != 0 and "axial parallelism, which needs model.engine=loom" in openfold.stderr
    assert chunks.returncode != 0 and "model.engine=openfold" in chunks.stderr
    assert r.returncode != 0 and "memory.budget_gb=0.10 is less than the" in r.stderr
    assert r.stderr.count("error") == 1 and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())                  # nothing half-written

"""OpenFold's AlphaFold for a recipe: configuration, weights (AlphaFold .npz or OpenFold .pt, with
the missing names said when they do not fit the preset), and the input features of one target."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from apps.protein.axial import Axial
from apps.protein.compat import load_openfold
from apps.protein.row_blocks import use_row_blocks
from apps.protein.evoformer import from_openfold
from apps.protein.plan import GIB
from apps.protein.config import ProteinRecipe
from apps.protein.fasta import Target
from core.errors import LoomError


def openfold_config(cfg: ProteinRecipe):
    load_openfold()
    from openfold.config import model_config

    m = cfg.model
    config = model_config(m.preset)
    if m.evoformer_blocks:
        config.model.evoformer_stack.no_blocks = m.evoformer_blocks
    if m.extra_msa_blocks:
        config.model.extra_msa.extra_msa_stack.no_blocks = m.extra_msa_blocks
    if m.structure_blocks:
        config.model.structure_module.no_blocks = m.structure_blocks
    config.data.common.max_recycling_iters = m.recycles
    config.model.template.enabled = True            # so that params with template weights load (see build_model)
    config.data.predict.max_msa_clusters = cfg.data.max_msa_clusters
    config.data.predict.max_extra_msa = cfg.data.max_extra_msa
    config.globals.chunk_size = m.chunk_size or None
    config.globals.use_lma = m.use_lma
    # OpenFold's chunk-size tuner tries ever larger chunks until one runs out of memory; on a CPU
    # none does, so it would pick the largest (several GiB more at a few hundred residues).
    config.model.evoformer_stack.tune_chunk_size = False
    config.model.extra_msa.extra_msa_stack.tune_chunk_size = False
    config.model.template.template_pair_stack.tune_chunk_size = False
    return config


def build_model(cfg: ProteinRecipe, config, ax: Axial | None = None) -> torch.nn.Module:
    """OpenFold's AlphaFold with the recipe's weights; with model.engine=loom its Evoformer and
    extra-MSA stacks are Loom's (same weights), chunked to memory.budget_gb and split over `ax`."""
    load_openfold()
    from openfold.model.model import AlphaFold

    model = AlphaFold(copy.deepcopy(config))          # its own copy: the template switch below is the model's
    path = cfg.model.params
    if path:
        load_params(model, Path(path), cfg.model.preset)
    # No template search: the features carry zero templates, whose embedding OpenFold multiplies
    # by zero, but it still runs the template pair stack on 4 padded templates ([4, N, N, 64]
    # activations, the largest tensors of a single-sequence run). The weights are loaded above;
    # the model skips the templates from here on.
    model.config.template.enabled = False
    if cfg.model.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    if cfg.model.engine == "loom":
        use_row_blocks(model)
        budget = int(cfg.memory.budget_gb * GIB) if cfg.memory.budget_gb else None
        spill = cfg.memory.spill_dir or None
        model.evoformer = from_openfold(model.evoformer, extra=False).configure(ax or Axial(), budget, spill_dir=spill)
        if config.model.extra_msa.enabled:
            model.extra_msa_stack = from_openfold(model.extra_msa_stack, extra=True).configure(ax or Axial(), budget,
                                                                                               spill_dir=spill)
    return model.eval()


def load_params(model: torch.nn.Module, path: Path, preset: str) -> None:
    if not path.is_file():
        raise LoomError(f"model.params: {path} does not exist")
    if path.suffix == ".npz":
        from openfold.utils import import_weights

        expected = import_weights.process_translation_dict(import_weights.generate_translation_dict(model, preset))
        with np.load(path) as data:
            present = set(data.keys())
        missing = [k for k in expected if k not in present]
        if missing:
            raise LoomError(f"model.params: {path} does not fit model.preset={preset}: {len(missing)} arrays are "
                            f"missing, e.g. {', '.join(missing[:3])}")
        import_weights.import_jax_weights_(model, str(path), version=preset)
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("ema", {}).get("params", state) if isinstance(state, dict) else state
    state = {k.removeprefix("model."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise LoomError(f"model.params: {path} does not fit model.preset={preset}: {len(result.missing_keys)} "
                        f"weights are missing, e.g. {', '.join(result.missing_keys[:3])}")


def features(target: Target, config, alignments: str = "") -> dict[str, torch.Tensor]:
    """The model's input for one target: its sequence, its alignments if a folder holds them
    (read with OpenFold's parsers), else the sequence alone as a one-row MSA."""
    load_openfold()
    from openfold.data import data_pipeline, feature_pipeline, parsers

    seq, n = target.sequence, len(target.sequence)
    msas, deletions = [[seq]], [[[0] * n]]
    folder = Path(alignments) / target.name if alignments else None
    if folder is not None:
        if not folder.is_dir():
            raise LoomError(f"data.alignments: no folder {folder} for target '{target.name}'")
        for f in sorted(folder.iterdir()):
            if f.suffix == ".a3m":
                msa, dels = parsers.parse_a3m(f.read_text())
            elif f.suffix == ".sto":
                msa, dels, _ = parsers.parse_stockholm(f.read_text())
            else:
                continue
            msas.append(msa)
            deletions.append(dels)
    feats = {**data_pipeline.make_sequence_features(seq, target.name, n),
             **data_pipeline.make_msa_features(msas, deletion_matrices=deletions),
             **data_pipeline.empty_template_feats(n)}
    processed = feature_pipeline.FeaturePipeline(config.data).process_features(feats, mode="predict")
    return {k: torch.as_tensor(v) for k, v in processed.items()}

"""OpenFold's AlphaFold for a recipe: configuration, weights (AlphaFold .npz or OpenFold .pt, with
the missing names said when they do not fit the preset), and the input features of one target."""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from apps.protein.axial import Axial
from apps.protein.compat import load_openfold
from apps.protein.row_blocks import use_row_blocks
from apps.protein.evoformer import from_openfold
from apps.protein.plan import GIB
from apps.protein.config import ProteinRecipe
from apps.protein.fasta import Target, decode_text
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
    extra-MSA stacks are Loom's (same weights), in blocks sized to memory.budget_gb, and the pair
    representation is split by rows over `ax`'s processes from the embedders to the heads."""
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
        use_row_blocks(model, ax)
        if cfg.model.pair_dtype != "same":
            model.pair_dtype = getattr(torch, cfg.model.pair_dtype)
        budget = int(cfg.memory.budget_gb * GIB) if cfg.memory.budget_gb else None
        spill = cfg.memory.spill_dir or None
        model.evoformer = from_openfold(model.evoformer, extra=False).configure(ax or Axial(), budget, spill_dir=spill)
        if config.model.extra_msa.enabled:
            model.extra_msa_stack = from_openfold(model.extra_msa_stack, extra=True).configure(ax or Axial(), budget,
                                                                                               spill_dir=spill)
    return model.eval()


# What reading a weights file that is damaged, truncated or of another kind raises, in numpy's,
# zipfile's, pickle's and torch's readers.
_UNREADABLE = (OSError, EOFError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile, zlib.error,
               pickle.UnpicklingError)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of each array of an .npz archive, from the arrays' headers alone."""
    fmt = np.lib.format
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            with archive.open(name) as f:
                read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
                shapes[name.removesuffix(".npy")] = read(f)[0]
    return shapes


def load_params(model: torch.nn.Module, path: Path, preset: str) -> None:
    if not path.is_file():
        raise LoomError(f"model.params: {path} does not exist")
    if path.suffix == ".npz":
        _load_alphafold(model, path, preset)
    else:
        _load_openfold(model, path, preset)


def _load_alphafold(model: torch.nn.Module, path: Path, preset: str) -> None:
    from openfold.utils import import_weights

    expected = import_weights.process_translation_dict(import_weights.generate_translation_dict(model, preset))
    try:
        shapes = _npz_shapes(path)
    except _UNREADABLE:
        raise LoomError(f"model.params: {path} is not a readable .npz archive (damaged, truncated or another "
                        f"kind of file); download params_{preset}.npz again") from None
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise LoomError(f"model.params: {path} does not fit model.preset={preset}: {len(missing)} arrays are "
                        f"missing, e.g. {', '.join(missing[:3])}")
    for key, param in expected.items():
        got = shapes[key][0] if shapes[key] else 0
        if param.stacked and got != len(param.param):    # OpenFold's importer would load the first blocks only
            raise LoomError(f"model.params: {path} holds {got} blocks of {key.split('//')[0]}, where the model has "
                            f"{len(param.param)}; set model.evoformer_blocks and model.extra_msa_blocks to the "
                            f"file's counts (0 = the preset's)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the importer prints the array it fails on
            import_weights.import_jax_weights_(model, str(path), version=preset)
    except _UNREADABLE as e:
        raise LoomError(f"model.params: {path} is damaged or its arrays do not fit model.preset={preset} "
                        f"({_first_line(e)})") from None


def _load_openfold(model: torch.nn.Module, path: Path, preset: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE:
        raise LoomError(f"model.params: {path} is neither AlphaFold params (.npz) nor a weights file torch can "
                        f"read safely (.pt): it is damaged, truncated, another kind of file, or a checkpoint that "
                        f"holds Python objects besides tensors (save its state dict alone with torch.save)") from None
    state = state.get("ema", {}).get("params", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoomError(f"model.params: {path} holds no state dict of weights (names to tensors), so it is not an "
                        f"OpenFold checkpoint")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:                       # a weight of another shape
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), _first_line(e))
        raise LoomError(f"model.params: {path} does not fit model.preset={preset} and its block counts: "
                        f"{detail}") from None
    if result.missing_keys:
        raise LoomError(f"model.params: {path} does not fit model.preset={preset}: {len(result.missing_keys)} "
                        f"weights are missing, e.g. {', '.join(result.missing_keys[:3])}")
    more = [k for k in result.unexpected_keys if k.startswith(("evoformer.blocks.", "extra_msa_stack.blocks."))]
    if more:
        raise LoomError(f"model.params: {path} holds more blocks than the model has (e.g. {more[0]}); set "
                        f"model.evoformer_blocks and model.extra_msa_blocks to the file's counts (0 = the preset's)")


def read_alignments(target: Target, alignments: str = "") -> tuple[list[list[str]], list[list[list[int]]]]:
    """The target's MSAs and deletion matrices, the sequence alone first and then every .a3m and
    .sto file of `alignments/<name>/` (read with OpenFold's parsers); a `LoomError` naming the file
    where one cannot be read or does not align to the target."""
    load_openfold()
    from openfold.data import parsers
    from openfold.np import residue_constants

    seq, n = target.sequence, len(target.sequence)
    msas, deletions = [[seq]], [[[0] * n]]
    if not alignments:
        return msas, deletions
    folder = Path(alignments) / target.name
    if not folder.is_dir():
        raise LoomError(f"data.alignments: no folder {folder} for target '{target.name}'")
    letters = set(residue_constants.HHBLITS_AA_TO_ID)
    for f in sorted(folder.iterdir()):
        if f.suffix not in (".a3m", ".sto"):
            continue
        try:
            text = decode_text(f.read_bytes(), f"data.alignments: {f}", "alignment")
        except OSError as e:
            raise LoomError(f"data.alignments: {f} cannot be read: {e.strerror or e}") from None
        try:
            if f.suffix == ".a3m":
                msa, dels = parsers.parse_a3m(text)
            else:
                msa, dels, _ = parsers.parse_stockholm(text)
        except (ValueError, IndexError):
            form = ("an A3M file is '>name' lines, each followed by its aligned sequence" if f.suffix == ".a3m"
                    else "a Stockholm file is '# ...' lines and 'name sequence' lines")
            raise LoomError(f"data.alignments: {f} is not a readable alignment ({form})") from None
        if not msa:
            raise LoomError(f"data.alignments: {f} holds no sequences")
        for i, row in enumerate(msa, start=1):
            if len(row) != n:
                raise LoomError(f"data.alignments: {f}: aligned sequence {i} has {len(row)} columns, but target "
                                f"'{target.name}' has {n} residues (an alignment for another sequence?)")
            bad = set(row) - letters
            if bad:
                raise LoomError(f"data.alignments: {f}: aligned sequence {i} has letters that are not amino acids "
                                f"or gaps: {', '.join(repr(c) for c in sorted(bad)[:5])}")
        msas.append(msa)
        deletions.append(dels)
    return msas, deletions


def features(target: Target, config, alignments: str = "") -> dict[str, torch.Tensor]:
    """The model's input for one target: its sequence, its alignments if a folder holds them
    (read with OpenFold's parsers), else the sequence alone as a one-row MSA."""
    load_openfold()
    from openfold.data import data_pipeline, feature_pipeline

    seq, n = target.sequence, len(target.sequence)
    msas, deletions = read_alignments(target, alignments)
    feats = {**data_pipeline.make_sequence_features(seq, target.name, n),
             **data_pipeline.make_msa_features(msas, deletion_matrices=deletions),
             **data_pipeline.empty_template_feats(n)}
    processed = feature_pipeline.FeaturePipeline(config.data).process_features(feats, mode="predict")
    return {k: torch.as_tensor(v) for k, v in processed.items()}

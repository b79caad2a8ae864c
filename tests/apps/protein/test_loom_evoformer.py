"""Loom's Evoformer put into OpenFold's AlphaFold predicts what OpenFold's own stacks predict with
the same weights: the stacks alone (m, z, s), and the whole model's final atom positions with
and without chunking, and split over 2 and 4 gloo ranks by axial parallelism (with the collectives
counted)."""

import random
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from apps.protein.compat import load_openfold
from apps.protein.config import ProteinRecipe
from apps.protein.evoformer import from_openfold
from apps.protein.fasta import parse_fasta
from apps.protein.model import build_model, features, openfold_config
from apps.protein.plan import HEAP_SLACK, Plan, Shapes, choose, held_bytes, longest, peak_bytes, smallest
from core.config import load_recipe
from core.distributed.testing import run_distributed
from core.errors import LoomError

SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQLEERLG"   # 28 residues; the 6 MSA and 5 extra rows pad on 4 ranks (5 on 2)
ATOL_ANGSTROM = 1e-3


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """OpenFold zero-initialises every residual output layer, so a fresh model's blocks change
    nothing and any two implementations would agree; noise on every weight makes them count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _recipe(engine: str) -> ProteinRecipe:
    cfg = load_recipe(ProteinRecipe, "protein/demo")
    cfg.model.engine = engine
    cfg.model.evoformer_blocks, cfg.model.extra_msa_blocks, cfg.model.structure_blocks = 2, 1, 2
    cfg.model.recycles = 1
    cfg.data.max_msa_clusters, cfg.data.max_extra_msa = 6, 5
    return cfg


def _config(cfg: ProteinRecipe):
    config = openfold_config(cfg)
    g = config.globals
    g.c_m, g.c_z, g.c_e, g.c_s = 32, 16, 16, 24
    config.model.template.enabled = False
    return config


def _batch(config, alignments):
    target = parse_fasta(f">t\n{SEQUENCE}\n")[0]
    return features(target, config, str(alignments))


def _alignments(root):
    """A small MSA of mutated copies of the target (so m has several rows)."""
    rng = random.Random(0)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    rows = [">query", SEQUENCE]
    for k in range(8):
        rows += [f">hit{k}", "".join(rng.choice(letters) if rng.random() < 0.3 else a for a in SEQUENCE)]
    (root / "t").mkdir(parents=True)
    (root / "t" / "hits.a3m").write_text("\n".join(rows) + "\n")
    return root


def _model(cfg, config, ax=None, plan=None, spill_dir=None):
    torch.manual_seed(0)
    np.random.seed(0)                       # OpenFold draws truncated-normal initial weights with scipy
    model = build_model(cfg, config, ax)
    _perturb(model, seed=1)
    if cfg.model.engine == "loom":          # the noise went into Loom's stacks' copies of the weights
        for stack in (model.evoformer, model.extra_msa_stack):
            stack.configure(stack.ax, plan=plan, spill_dir=spill_dir)
    return model


def _positions(model, batch):
    with torch.no_grad():
        return model(batch)["final_atom_positions"]


def _stack_inputs(s, n, c_m, c_z, seed):
    g = torch.Generator().manual_seed(seed)
    m, z = torch.randn(s, n, c_m, generator=g), torch.randn(n, n, c_z, generator=g)
    msa_mask = (torch.rand(s, n, generator=g) > 0.2).float()
    pair_mask = (torch.rand(n, n, generator=g) > 0.1).float()
    return m, z, msa_mask, pair_mask


@pytest.mark.parametrize("extra", [False, True])
def test_loom_stacks_equal_openfolds(extra, tmp_path):
    load_openfold()
    from openfold.config import model_config
    from openfold.model.evoformer import EvoformerStack, ExtraMSAStack

    c = model_config("model_1")
    c.globals.c_m, c.globals.c_z, c.globals.c_e, c.globals.c_s = 32, 16, 16, 24
    if extra:
        kw = dict(c.model.extra_msa.extra_msa_stack, no_blocks=2, tune_chunk_size=False, ckpt=False)
        theirs = ExtraMSAStack(**kw).eval()
    else:
        kw = dict(c.model.evoformer_stack, no_blocks=2, tune_chunk_size=False, blocks_per_ckpt=None)
        theirs = EvoformerStack(**kw).eval()
    _perturb(theirs, seed=2, scale=0.2)
    ours = from_openfold(theirs, extra=extra)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    m, z, msa_mask, pair_mask = _stack_inputs(5, 13, kw["c_m"], kw["c_z"], seed=3)
    args = dict(msa_mask=msa_mask, pair_mask=pair_mask, chunk_size=None, _mask_trans=True)
    with torch.no_grad():
        expected = theirs(m.clone(), z.clone(), inplace_safe=False, **args)
        for plan in (Plan(rows=13, msa_rows=5, queries=13, channels=64), Plan(rows=3, msa_rows=2, queries=5, channels=4),
                     Plan(rows=2, msa_rows=2, queries=5, channels=4, strips=4),      # strips of 4, 4, 4, 1 rows
                     Plan(rows=2, msa_rows=2, queries=5, channels=4, strips=4, spill=True)):
            ours.configure(ours.ax, plan=plan, spill_dir=str(tmp_path / "spill") if plan.spill else None)
            got = ours(m.clone(), z.clone(), inplace_safe=True, **args)
            for a, b in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
                assert torch.allclose(a, b, atol=1e-4, rtol=1e-5), (plan, (a - b).abs().max())
        # spilled: every tile below the strips' diagonal went through the file once per triangle
        # multiplication (2 per block), and the file's folder is gone
        below = sum(a * b for i, a in enumerate((4, 4, 4, 1)) for b in (4, 4, 4, 1)[:i])
        assert ours.spilled_bytes == len(ours.blocks) * 2 * below * kw["c_z"] * 4
        assert list((tmp_path / "spill").iterdir()) == []
        z_in = z.clone()
        ours(m.clone(), z_in, inplace_safe=True, **args)
        assert not torch.equal(z_in, z)                      # one process: z is updated in place
    with pytest.raises(LoomError, match="inference only"):
        ours(m, z, inplace_safe=False, **args)


def test_row_block_modules_compute_what_openfolds_do():
    """The input and recycling embedders, the structure module's pair LayerNorm with the invariant
    point attention, and the distogram head, a block of pair rows at a time (tiny blocks here),
    give OpenFold's results (the distogram logits when read); the recycling update and the deferred
    pair embedding land in z_prev's own storage."""
    import apps.protein.row_blocks as emb

    cfg = _recipe("openfold")
    config = _config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, config)
    _perturb(model, seed=1)
    n, g = 29, torch.Generator().manual_seed(4)
    tf = torch.nn.functional.one_hot(torch.randint(0, 22, (n,), generator=g), 22).float()
    ri = torch.arange(n).float() + 3 * (torch.arange(n) > 15)             # a chain break: other offsets
    msa = torch.rand(4, n, 49, generator=g)
    z_prev, x, m_prev = torch.randn(n, n, 16, generator=g), torch.randn(n, 3, generator=g) * 10, torch.randn(n, 32)
    sm, heads = model.structure_module, model.aux_heads
    with torch.no_grad():
        want_m, want_z = model.input_embedder(tf, ri, msa, inplace_safe=True)
        want_rm, want_rz = model.recycling_embedder(m_prev.clone(), z_prev.clone(), x, inplace_safe=True)
        from openfold.utils.rigid_utils import Rigid

        frames = Rigid.from_tensor_7(torch.randn(n, 7, generator=g) * 3, normalize_quats=True)
        single, seq_mask = torch.randn(n, 24, generator=g), (torch.rand(n, generator=g) > 0.1).float()
        want_ipa = sm.ipa(single, sm.layer_norm_z(z_prev), frames, seq_mask, inplace_safe=True)
        want_dist = heads.distogram(z_prev)
        old, emb.BLOCK_BYTES = emb.BLOCK_BYTES, 3 * n * 16 * 4          # three rows per block
        try:
            emb.use_row_blocks(model)
            got_m, pair = model.input_embedder(tf, ri, msa, inplace_safe=True)
            assert isinstance(pair, emb.DeferredPair)
            got_z = pair.whole()
            z_in = z_prev.clone()
            got_rm, got_rz = model.recycling_embedder(m_prev.clone(), z_in, x, inplace_safe=True)
            summed = got_rz.clone()
            storage = summed.data_ptr()
            pair += summed                                   # OpenFold's add(z, z_prev_emb, inplace=True)
            normed = sm.layer_norm_z(z_prev)
            assert isinstance(normed, emb.NormedRows)
            got_ipa = sm.ipa(single, normed, frames, seq_mask, inplace_safe=True)
            deferred = heads.distogram(z_prev)
            assert isinstance(deferred, emb.DeferredDistogram) and deferred.shape == want_dist.shape
            got_dist = deferred.whole()
        finally:
            emb.BLOCK_BYTES = old
    assert type(model.input_embedder).__name__ == "RowBlockInputEmbedder"
    assert type(model.structure_module.ipa).__name__ == "RowBlockInvariantPointAttention"
    assert pair is summed and summed.data_ptr() == storage
    for got, want in ((got_m, want_m), (got_z, want_z), (got_rm, want_rm), (got_rz, want_rz), (got_ipa, want_ipa),
                      (summed, want_z + want_rz), (got_dist, want_dist)):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()     # blocked matmuls round differently
    assert got_rz.data_ptr() == z_in.data_ptr()
    assert torch.equal(got_dist, got_dist.transpose(0, 1))


def test_bfloat16_stacks_stay_close_to_fp32():
    """model.dtype=bfloat16 halves every activation; the stack's output stays within bf16's
    precision of the fp32 one (relative to its size)."""
    load_openfold()
    from openfold.config import model_config
    from openfold.model.evoformer import EvoformerStack

    c = model_config("model_1")
    c.globals.c_m, c.globals.c_z, c.globals.c_s = 32, 16, 24
    kw = dict(c.model.evoformer_stack, no_blocks=2, tune_chunk_size=False, blocks_per_ckpt=None)
    theirs = EvoformerStack(**kw).eval()
    _perturb(theirs, seed=2, scale=0.1)
    ours = from_openfold(theirs, extra=False)
    m, z, msa_mask, pair_mask = _stack_inputs(5, 13, kw["c_m"], kw["c_z"], seed=3)
    args = dict(msa_mask=msa_mask, pair_mask=pair_mask, chunk_size=None, inplace_safe=True, _mask_trans=True)
    with torch.no_grad():
        _, z32, _ = ours(m.clone(), z.clone(), **args)
        ours.to(torch.bfloat16)
        _, z16, _ = ours(m.to(torch.bfloat16), z.to(torch.bfloat16), **{**args, "msa_mask": msa_mask.bfloat16(),
                                                                        "pair_mask": pair_mask.bfloat16()})
    assert z16.dtype == torch.bfloat16
    assert (z16.float() - z32).norm() / z32.norm() < 0.03


def test_the_loom_engine_predicts_openfolds_atoms_with_and_without_chunks(tmp_path):
    alignments = _alignments(tmp_path / "msa")
    cfg_of, cfg_loom = _recipe("openfold"), _recipe("loom")
    config = _config(cfg_of)
    batch = _batch(config, alignments)
    assert batch["msa_feat"].shape[-4] == 6 and batch["aatype"].shape[-1] == 2   # 6 MSA rows, 2 cycles
    expected = _positions(_model(cfg_of, config), batch)
    for plan in (None, Plan(rows=5, msa_rows=2, queries=7, channels=4, strips=3),
                 Plan(rows=5, msa_rows=2, queries=7, channels=4, strips=3, spill=True)):
        got = _positions(_model(cfg_loom, config, plan=plan, spill_dir=tmp_path / "spill"), batch)
        assert (got - expected).abs().max() <= ATOL_ANGSTROM, (plan, (got - expected).abs().max())
    # the comparison can fail: other Evoformer weights move the atoms by far more than the tolerance
    other = _model(cfg_of, config)
    _perturb(other.evoformer, seed=5, scale=0.05)
    assert (_positions(other, batch) - expected).abs().max() > 100 * ATOL_ANGSTROM


def _rmsd(a: torch.Tensor, b: torch.Tensor, batch) -> float:
    """Root-mean-square distance in Angstrom over the atoms that exist."""
    exists = batch["atom37_atom_exists"][..., -1].bool()
    return (a.float() - b.float())[exists].pow(2).sum(-1).mean().sqrt().item()


def test_bfloat16_pair_representation_and_bfloat16_model_stay_close_to_fp32(tmp_path):
    """model.pair_dtype=bfloat16 holds z (and the stacks' pair-sized buffers) in bfloat16 with the
    weights and the arithmetic in fp32; model.dtype=bfloat16 runs everything in bfloat16. The atoms
    of both stay within a fraction of an Angstrom of fp32's on the parity target (the README quotes
    these distances), the pair-only one closer."""
    cfg = _recipe("loom")
    config = _config(cfg)
    np.random.seed(0)                       # OpenFold's MSA sampling
    batch = _batch(config, _alignments(tmp_path / "msa"))
    expected = _positions(_model(cfg, config), batch)
    cfg.model.pair_dtype = "bfloat16"
    model = _model(cfg, config)
    with torch.no_grad():
        out = model(batch)
    assert out["pair"].dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    pair_only = _rmsd(out["final_atom_positions"], expected, batch)
    cfg.model.pair_dtype, cfg.model.dtype = "same", "bfloat16"
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in batch.items()}
    whole = _rmsd(_positions(_model(cfg, config), half), expected, batch)
    assert 0 < pair_only < whole < 1.0, (pair_only, whole)


def test_the_budget_sets_the_chunks_and_an_impossible_one_names_the_longest_length(tmp_path):
    cfg = _recipe("loom")
    config = _config(cfg)
    batch = _batch(config, _alignments(tmp_path / "msa"))
    model = _model(cfg, config)                            # the budget: 90% of the free memory
    roomy = _positions(model, batch)
    loose = model.evoformer.last_plan
    assert loose.rows == len(SEQUENCE)                     # 28 residues fit in one chunk
    for stack, rows in ((model.evoformer, 6), (model.extra_msa_stack, 5)):
        sh = stack.shapes(rows, len(SEQUENCE), 4)
        smallest_peak = peak_bytes(sh, smallest(sh))
        stack.budget = None
        stack.plan = choose(sh, smallest_peak + (smallest_peak - held_bytes(sh) - HEAP_SLACK))  # 2x the temporaries
        assert stack.plan.rows < len(SEQUENCE)
    assert (_positions(model, batch) - roomy).abs().max() <= ATOL_ANGSTROM
    with pytest.raises(LoomError, match=r"longest sequence that fits is about \d+ residues") as refused:
        choose(sh, smallest_peak - 1)
    assert 0 < longest(sh, smallest_peak - 1) < len(SEQUENCE) <= longest(sh, smallest_peak)
    # ... on this one process, and on two, where each holds half of z's rows (at these tiny channel
    # counts the gathered operands outweigh the rows saved; AlphaFold's: the test below)
    one, two = map(int, re.search(r"about (\d+) residues on 1 process \(about (\d+) on 2 processes",
                                  str(refused.value)).groups())
    assert one == longest(sh, smallest_peak - 1)
    assert two == longest(replace(sh, ranks=2, pair_split=True), smallest_peak - 1)


def test_the_plan_counts_only_this_ranks_rows_of_a_split_pair_representation():
    """Per rank, a z split over p processes is counted as its 1/p rows; the longest sequence a
    per-process budget fits grows with the processes."""
    sh = Shapes(s=1, n=384, c_m=256, c_z=128, heads_msa=8, c_att=32, c_opm=32, c_mul=128, heads_pair=4,
                c_pair_att=32, transition_n=4, extra=False)
    z = 384 * 384 * 128 * 4
    four = replace(sh, ranks=4)
    assert held_bytes(four) - held_bytes(replace(four, pair_split=True)) == z
    budget = peak_bytes(sh, smallest(sh))
    lengths = [longest(replace(sh, ranks=p, pair_split=True), budget) for p in (1, 2, 4)]
    assert lengths[0] >= 384 and lengths[0] < lengths[1] < lengths[2]
    # a bfloat16 z (model.pair_dtype) is counted at its own size
    assert held_bytes(replace(four, pair_split=True)) - held_bytes(replace(four, pair_split=True, pair_bytes_per=2)) \
        == z // 4 // 2


def test_past_what_fits_in_memory_the_plan_spills_the_waiting_updates_when_allowed():
    """At AlphaFold's sizes, 960 residues: the waiting updates of the strip triangle
    multiplication (a quarter of z) set the smallest plan's peak; a file for them lowers it, the
    planner uses one only where nothing fits without it, and its refusal says so."""
    sh = Shapes(s=1, n=960, c_m=256, c_z=128, heads_msa=8, c_att=32, c_opm=32, c_mul=128, heads_pair=4,
                c_pair_att=32, transition_n=4, extra=False)
    z = 960 * 960 * 128 * 4
    in_memory, spilled = peak_bytes(sh, smallest(sh)), peak_bytes(sh, smallest(sh, spill=True))
    assert in_memory - spilled > z // 5
    budget = (in_memory + spilled) // 2
    with pytest.raises(LoomError, match=r"about \d+ with memory.spill_dir set"):
        choose(sh, budget)
    plan = choose(sh, budget, spill=True)
    assert plan.spill and plan.strips > 1 and peak_bytes(sh, plan) <= budget
    assert longest(sh, budget) < 960 < longest(sh, budget, spill=True)
    assert not choose(sh, in_memory, spill=True).spill          # where memory suffices, no file


def test_the_waiting_updates_refuse_a_folder_in_memory(tmp_path, monkeypatch):
    import apps.protein.spill as spill

    assert spill.filesystem_type("/proc/self") == "proc"
    monkeypatch.setattr(spill, "filesystem_type", lambda path: "tmpfs")
    with pytest.raises(LoomError, match="tmpfs, which keeps files in memory"):
        spill.WaitingUpdates(tmp_path, 4, 3, 8, torch.float32)


class _LargestTensor(TorchDispatchMode):
    """The most elements of any operation's output shaped like rows of z: three or more
    dimensions, the last of `channels` (the pair representation's width; every op, collectives'
    buffers included). Weights are left out, and so are other block temporaries (the outer
    product's c_opm^2 channels), which follow the plan's blocks, not z."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels, self.most = channels, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_flatten(out)[0]
                 if isinstance(t, torch.Tensor) and t.dim() >= 3 and t.shape[-1] == self.channels]
        self.most = max([self.most, *sizes])
        return out


def _dap_worker(batch, plan, preset):
    from apps.protein.axial import Axial
    from core.distributed import ParallelMesh

    mesh = ParallelMesh.one_axis("axial", "cpu")
    cfg = _recipe("loom")
    cfg.model.preset = preset
    config = _config(cfg)
    model = _model(cfg, config, Axial(mesh.axis("axial")), plan)
    mesh.stats.reset()
    largest = _LargestTensor(config.globals.c_z)
    with torch.no_grad(), largest:
        out = model(batch)
    # the all-gathers one cycle makes: per block the row attention's pair bias (one per head), the
    # outer product's gathered side, each triangle multiplication's other side per channel step
    # and each triangle attention's bias (per head); per stack, m at the end (z stays split); per
    # structure-module iteration, the invariant point attention's output rows
    gathers = 0
    for stack in (model.evoformer, model.extra_msa_stack):
        channel_steps = -(-stack.dims["c_hidden_mul"] // stack.last_plan.channels)
        heads = stack.dims["no_heads_msa"] + 2 * stack.dims["no_heads_pair"]
        gathers += len(stack.blocks) * (heads + 1 + 2 * channel_steps) + 1
    gathers += cfg.model.structure_blocks
    confidence = {k: out[k] for k in ("predicted_aligned_error", "predicted_tm_score") if k in out}
    return out["final_atom_positions"], mesh.stats.as_dict(), gathers, largest.most, confidence


@pytest.mark.parametrize("ranks, preset", [(2, "model_1_ptm"), (4, "model_1")])
def test_axial_parallelism_predicts_the_same_atoms(tmp_path, ranks, preset):
    """The atoms (and, with a _ptm preset, the predicted aligned error and TM score) of 2 and 4
    processes equal OpenFold's, and no process ever makes a tensor as large as the whole pair
    representation (c_z channels): each holds only its rows of z from the embedders to the heads."""
    alignments = _alignments(tmp_path / "msa")
    cfg = _recipe("openfold")
    cfg.model.preset = preset
    config = _config(cfg)
    batch = _batch(config, alignments)       # OpenFold samples MSA clusters afresh each call: every rank gets these
    with torch.no_grad():
        reference = _model(cfg, config)(batch)
    expected = reference["final_atom_positions"]
    plan = Plan(rows=4, msa_rows=1, queries=8, channels=8) if ranks == 4 else None
    results = run_distributed(_dap_worker, world_size=ranks, args=(batch, plan, preset), timeout=300)
    whole_z = len(SEQUENCE) ** 2 * config.globals.c_z
    for positions, _, _, largest, confidence in results:
        assert (positions - expected).abs().max() <= ATOL_ANGSTROM, (positions - expected).abs().max()
        assert largest < whole_z, (largest, whole_z)
        for key, got in confidence.items():
            assert torch.allclose(got, reference[key], atol=1e-4, rtol=1e-4), (key, got - reference[key])
    confident = ["predicted_aligned_error", "predicted_tm_score"]
    assert sorted(results[0][4]) == (confident if preset.endswith("ptm") else [])
    _, stats, gathers, _, _ = results[0]
    cycles = cfg.model.recycles + 1
    blocks = (cfg.model.evoformer_blocks + cfg.model.extra_msa_blocks) * cycles
    # per block: the MSA switches between sequence and residue splits twice (all-to-all), z between
    # rows and columns four times (three in a stack's first block, one more to end on rows), each
    # time swapping a tile with every other rank
    assert stats["axial"]["all_to_all"]["calls"] == 2 * blocks
    assert stats["axial"]["send"]["calls"] == stats["axial"]["recv"]["calls"] == 4 * blocks * (ranks - 1)
    heads = 2 if preset.endswith("ptm") else 0         # the TM terms and the aligned error, once at the end
    assert stats["axial"]["all_gather"]["calls"] == gathers * cycles + heads


def test_one_process_holds_the_whole_pair_representation():
    """The check above can fail: on one process the same count sees tensors of z's size."""
    cfg = _recipe("loom")
    config = _config(cfg)
    target = parse_fasta(f">t\n{SEQUENCE}\n")[0]
    batch = features(target, config)
    model = _model(cfg, config)
    largest = _LargestTensor(config.globals.c_z)
    with torch.no_grad(), largest:
        model(batch)
    assert largest.most >= len(SEQUENCE) ** 2 * config.globals.c_z

"""OpenFold (PyPI 0.0.1) imports and runs on this CPU build through `apps.protein.compat`: the
three fixes, and a reduced AlphaFold forward on a single sequence with random weights."""

import torch

from apps.protein.compat import load_openfold


def test_the_attention_kernel_stand_in_matches_autograd():
    load_openfold()
    from openfold.utils.kernel.attention_core import attention_core

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64).float().requires_grad_(True)
               for _ in range(3))
    bias = torch.randn(2, 3, 5, 5, generator=g)
    grad = torch.randn(2, 3, 5, 4, generator=g)
    out = attention_core(q, k, v, bias)
    out.backward(grad)
    got = [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref = torch.softmax(q2 @ k2.transpose(-1, -2) + bias, dim=-1) @ v2
    ref.backward(grad)
    for a, b in zip(got, [ref.detach(), q2.grad, k2.grad, v2.grad]):
        assert torch.allclose(a, b, atol=1e-5)


def test_reduced_alphafold_predicts_finite_atoms_on_one_sequence():
    load_openfold()
    import openfold.data.mmcif_parsing  # noqa: F401  (needs the SCOPData fix)
    from openfold.config import model_config
    from openfold.data import data_pipeline, feature_pipeline
    from openfold.model.model import AlphaFold

    cfg = model_config("model_1")
    cfg.model.evoformer_stack.no_blocks = 2
    cfg.model.extra_msa.extra_msa_stack.no_blocks = 1
    cfg.model.structure_module.no_blocks = 2
    cfg.model.template.enabled = False
    cfg.data.common.max_recycling_iters = 0
    cfg.data.predict.max_msa_clusters = 1
    cfg.data.predict.max_extra_msa = 1
    seq = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEV"
    feats = {**data_pipeline.make_sequence_features(seq, "demo", len(seq)),
             **data_pipeline.make_msa_features([[seq]], deletion_matrices=[[[0] * len(seq)]]),
             **data_pipeline.empty_template_feats(len(seq))}
    batch = {k: torch.as_tensor(v) for k, v in
             feature_pipeline.FeaturePipeline(cfg.data).process_features(feats, mode="predict").items()}
    torch.manual_seed(0)
    with torch.no_grad():
        out = AlphaFold(cfg).eval()(batch)
    atoms = out["final_atom_positions"]
    assert atoms.shape == (len(seq), 37, 3) and torch.isfinite(atoms).all()

"""Everything Loom does to make OpenFold (PyPI `openfold==0.0.1`, the OpenFold v1.0.1 code) import
and run with today's numpy, Biopython and a CPU-only build, in one place. `load_openfold()` applies
each fix once, before the first `import openfold`; every module of the protein app calls it.
"""

from __future__ import annotations

import sys
import types

_APPLIED = False


def _numpy_object() -> None:
    # numpy 1.24 removed the `np.object` alias, which openfold.data.templates uses in its
    # feature-type table; it always meant the builtin `object`.
    import numpy as np

    if "object" not in np.__dict__:
        np.object = object


def _scop_data() -> None:
    # Biopython 1.82 removed Bio.Data.SCOPData, which openfold.data.mmcif_parsing imports for
    # its 3-letter -> 1-letter residue table; Bio.Data.PDBData.protein_letters_3to1_extended is
    # the same table under its new name.
    try:
        import Bio.Data.SCOPData  # noqa: F401
        return
    except ImportError:
        pass
    import Bio.Data
    from Bio.Data import PDBData

    module = types.ModuleType("Bio.Data.SCOPData")
    module.protein_letters_3to1 = PDBData.protein_letters_3to1_extended
    sys.modules["Bio.Data.SCOPData"] = module
    Bio.Data.SCOPData = module


def _attention_core() -> None:
    # Without CUDA, openfold builds a stub `attn_core_inplace_cuda` whose functions raise; its MSA
    # row attention and the structure module's IPA call it at inference. This stand-in does the
    # same two in-place operations in torch: a softmax over the last dimension (forward_), and
    # the softmax backward given the output gradient and the values (backward_).
    import torch

    def forward_(logits: torch.Tensor, rows: int, cols: int) -> None:
        logits.copy_(torch.softmax(logits, dim=-1))

    def backward_(probs: torch.Tensor, grad_out: torch.Tensor, v: torch.Tensor, rows: int, cols: int,
                  v_dim: int) -> None:
        grad_probs = torch.matmul(grad_out, v.transpose(-1, -2))
        probs.copy_(probs * (grad_probs - (probs * grad_probs).sum(dim=-1, keepdim=True)))

    module = types.ModuleType("attn_core_inplace_cuda")
    module.forward_, module.backward_ = forward_, backward_
    if not torch.cuda.is_available() or "attn_core_inplace_cuda" not in sys.modules:
        sys.modules["attn_core_inplace_cuda"] = module


def _quiet_list_indexing() -> None:
    # OpenFold indexes tensors with lists of slices (x[[slice, ...]]), which torch deprecates with
    # a warning on every call; torch 2.13 still reads them as tuples, so the results are right
    # (the tests check OpenFold's outputs), and the warning is silenced for OpenFold's code only.
    import warnings

    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing",
                            category=UserWarning, module=r"openfold\.")
    # In bf16, OpenFold's LayerNorm and softmax switch autocast off with the old
    # torch.cuda.amp.autocast spelling, which torch now warns about; it still does the same.
    warnings.filterwarnings("ignore", message=r"`torch.cuda.amp.autocast\(args...\)` is deprecated",
                            category=FutureWarning, module=r"openfold\.")


def load_openfold():
    """Apply the fixes (once) and return the `openfold` package."""
    global _APPLIED
    if not _APPLIED:
        import torch  # noqa: F401  (openfold.utils.checkpointing expects importlib.util loaded)

        _numpy_object()
        _scop_data()
        _attention_core()
        _quiet_list_indexing()
        _APPLIED = True
    import openfold

    return openfold

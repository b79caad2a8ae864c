"""Dynamic axial parallelism (FastFold, arXiv 2203.00854): the MSA representation m [S, N, C_m] and
the pair representation z [N, N, C_z] are split along one axis across the ranks of a process axis,
and all-to-all switches the split axis where an operation needs the other one.

The pair representation is always held as *rows*: either rows of z (layout "R": rank r holds
z[i, :] for its residues i) or rows of z transposed (layout "T": rank r holds z[:, j] stored as
z^T[j, :]). Every pair operation is written for rows, so "along columns" means "switch to T". With
one rank the switch is an in-place transpose of the square z; with several it is one all-to-all.
The MSA is split by sequences ("S", for row attention along residues) or by residues ("N", for
column attention, the transition and the outer product mean).
"""

from __future__ import annotations

import torch

from core.distributed.comm import AxisGroup, all_gather, all_to_all


class Axial:
    """This rank's view of the axial-parallel group: its size, its rank and the counted
    collectives between the ranks (none with one rank)."""

    def __init__(self, axis: AxisGroup | None = None) -> None:
        self.axis = axis
        self.size = axis.size if axis is not None else 1
        self.rank = axis.rank if axis is not None else 0

    def padded(self, n: int) -> int:
        """`n` rounded up to a multiple of the group size (padding is masked out)."""
        return -(-n // self.size) * self.size

    def local(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's equal part of `x` along `dim` (a view)."""
        if self.size == 1:
            return x
        n = x.shape[dim] // self.size
        return x.narrow(dim, self.rank * n, n)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's `x`, concatenated along `dim` in rank order."""
        return x if self.size == 1 else all_gather(x, self.axis, dim)

    def swap(self, x: torch.Tensor, split: int, join: int) -> torch.Tensor:
        """From split along `join` to split along `split` (one all-to-all)."""
        return x if self.size == 1 else all_to_all(x, self.axis, split, join)

    def transpose_rows(self, z: torch.Tensor, block: int) -> torch.Tensor:
        """Rows of z -> rows of z^T (or back). One rank: in place, `block` x `block` tiles at a time,
        so no second copy of z is made."""
        if self.size == 1:
            return transpose_square_(z, block)
        cols = self.swap(z, split=1, join=0)          # [N, N/p, C]: every row, this rank's columns
        return cols.transpose(0, 1).contiguous()


def transpose_square_(z: torch.Tensor, block: int) -> torch.Tensor:
    """z[i, j] <-> z[j, i] in place for a square [N, N, ...] tensor, tile by tile."""
    n = z.shape[0]
    block = max(1, block)
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        diag = z[i0:i1, i0:i1]
        diag.copy_(diag.transpose(0, 1).clone())
        for j0 in range(i1, n, block):
            j1 = min(j0 + block, n)
            upper = z[i0:i1, j0:j1].clone()
            z[i0:i1, j0:j1] = z[j0:j1, i0:i1].transpose(0, 1)
            z[j0:j1, i0:i1] = upper.transpose(0, 1)
    return z

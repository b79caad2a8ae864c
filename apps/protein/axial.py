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

from core.distributed.comm import AxisGroup, all_gather, all_to_all, irecv, isend


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
        """Rows of z -> rows of z^T (or back), in place: this rank's rows [P/p, P, C] become its rows
        of z^T. One rank: `block` x `block` tiles at a time. Several: the [P/p, P/p] tile of z at
        rank q's columns goes to q, and q's tile at this rank's columns comes back, transposed, into
        the same place, one peer after another (round k pairs rank r with rank (k - r) mod p, so
        each pair swaps its tiles in one round, and the round where r meets itself transposes
        its own tile). Two tiles' buffers are all it takes beside z, where an all-to-all of the
        whole part would hold z's part three times over."""
        if self.size == 1:
            return transpose_square_(z, block)
        per = z.shape[0]
        send, recv = z.new_empty(per, per, *z.shape[2:]), z.new_empty(per, per, *z.shape[2:])
        for k in range(self.size):
            peer = (k - self.rank) % self.size
            tile = z[:, peer * per:(peer + 1) * per]
            if peer == self.rank:
                transpose_square_(tile, block)
                continue
            send.copy_(tile)
            works = [isend(send, self.axis, peer), irecv(recv, self.axis, peer)]
            for work in works:
                work.wait()
            tile.copy_(recv.transpose(0, 1))
        return z


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


class PairRows:
    """The pair representation z [N, N, C] as this rank holds it for the whole model: its block of
    rows, `local` [P / p, P, C] where P is N padded to a multiple of the group size p. Rank r
    holds rows r * P / p onwards; the padding (rows and columns from N on) is masked out wherever
    it is read. With one rank, `local` is z itself. `whole()` gathers z (every rank must call it)."""

    def __init__(self, local: torch.Tensor, ax: Axial, n: int) -> None:
        self.local, self.ax, self.n = local, ax, n
        self.start = ax.rank * local.shape[0]
        self.stop = min(self.start + local.shape[0], n)          # real rows: [start, stop)
        self.shape = torch.Size((n, n, local.shape[-1]))
        self.dtype, self.device = local.dtype, local.device

    @classmethod
    def zeros(cls, ax: Axial, n: int, channels: int, like: torch.Tensor,
              dtype: torch.dtype | None = None) -> "PairRows":
        padded = ax.padded(n)
        return cls(like.new_zeros(padded // ax.size, padded, channels, dtype=dtype or like.dtype), ax, n)

    @classmethod
    def of(cls, z) -> "PairRows":
        """`z` itself if it is `PairRows`, else a whole z as one process's rows (no copy)."""
        return z if isinstance(z, PairRows) else cls(z, Axial(), z.shape[0])

    def dim(self) -> int:
        return 3

    def clear_padding_(self) -> None:
        """Zero the padded rows and columns (operations leave values there that nothing reads)."""
        self.local[:, self.n:] = 0
        self.local[max(self.stop - self.start, 0):] = 0

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's [P / p, ...] per-row result (rows beyond N included), as [N, ...]."""
        return self.ax.gather(rows, dim=0)[:self.n]

    def whole(self) -> torch.Tensor:
        return self.gather_rows(self.local)[:, :self.n]

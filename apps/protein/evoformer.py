"""Loom's Evoformer and extra-MSA stacks for inference, put into OpenFold's `AlphaFold` in place of
its own (the FastFold approach: OpenFold's embedders, structure module, heads and feature pipeline
stay as they are).

The modules carry OpenFold's parameter names and shapes, so a state dict moves between the two
unchanged (`from_openfold` loads one with strict checking). What differs is how a block runs:

- every residual update is written into the MSA and pair representations in place, a block of
  rows at a time, so a block holds z once plus one block's temporaries;
- the blocks (rows, attention queries, triangle-multiplication channels) come from a `Plan`,
  which `apps.protein.plan` sizes from a memory budget;
- with dynamic axial parallelism (`apps.protein.axial`) each rank holds 1/p of m and z and the
  collectives switch the split axis where an operation needs it.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from apps.protein.axial import Axial, PairRows, transpose_square_
from apps.protein.plan import GIB, Plan, Shapes, blocks, choose, longest, strip_spans, what_fits
from apps.protein.spill import HeldUpdates, WaitingUpdates
from core.distributed.comm import all_gather_into
from core.errors import LoomError
from core.memory.store import trim_heap
from core.memory.usage import free_bytes, process_bytes


# Where the budget leaves a choice, blocks whose temporaries stay under these (beyond the least any
# plan needs) run fastest (measured on the CPU: beyond a few tens of MiB each block's fresh pages
# cost more than the extra steps).
PREFER_CPU_CHUNK = 64 << 20
MIN_CPU_CHUNK = 4 << 20
PREFER_GPU_CHUNK = 2 << 30
# What the plan leaves free beyond its estimates (and at least 10% of what is free): the
# allocator's slack, torch's own temporaries inside an operation, and the row blocks OpenFold's
# modules run in around the stacks (apps.protein.row_blocks: ~64 MiB each).
UNMODELLED = 128 << 20


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that reads its input in its weights' dtype: a pair representation held in
    bfloat16 (model.pair_dtype) is normalised, and everything after it computed, in the model's
    dtype. Every read of z in a block goes through one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


def _linear(c_in: int, c_out: int, bias: bool = True) -> nn.Linear:
    return nn.Linear(c_in, c_out, bias=bias)


class Attention(nn.Module):
    """Gated multi-head attention (OpenFold's `Attention`: q, k, v without bias, gate, output)."""

    def __init__(self, c_in: int, c_hidden: int, heads: int) -> None:
        super().__init__()
        self.c_hidden, self.heads = c_hidden, heads
        self.linear_q = _linear(c_in, c_hidden * heads, bias=False)
        self.linear_k = _linear(c_in, c_hidden * heads, bias=False)
        self.linear_v = _linear(c_in, c_hidden * heads, bias=False)
        self.linear_o = _linear(c_hidden * heads, c_in)
        self.linear_g = _linear(c_in, c_hidden * heads)

    def update_rows_(self, stream: torch.Tensor, norm: nn.Module, key_mask: torch.Tensor,
                     bias: torch.Tensor | None, inf: float, plan_rows: int, queries: int) -> None:
        """stream [R, L, C] += attention along L within each row of norm(stream); `key_mask`
        [R, L]; `bias` [H, L, L] shared by every row. A row's update reads only that row, so rows
        are updated in place, `plan_rows` rows and `queries` queries at a time."""
        n_rows, length, _ = stream.shape
        h, d = self.heads, self.c_hidden
        for r0, r1 in blocks(n_rows, plan_rows):
            x = norm(stream[r0:r1])
            r = r1 - r0
            k = self.linear_k(x).view(r, length, h, d).permute(0, 2, 3, 1)
            v = self.linear_v(x).view(r, length, h, d).transpose(1, 2)
            mask_bias = (inf * (key_mask[r0:r1] - 1))[:, None, None, :].to(x.dtype)
            for q0, q1 in blocks(length, queries):
                xq = x[:, q0:q1]
                q = self.linear_q(xq).view(r, q1 - q0, h, d).transpose(1, 2) / math.sqrt(d)
                logits = torch.matmul(q, k)
                logits += mask_bias
                if bias is not None:
                    logits += bias[:, q0:q1]
                o = torch.matmul(torch.softmax(logits, dim=-1), v).transpose(1, 2)
                del logits
                g = torch.sigmoid(self.linear_g(xq)).view(r, q1 - q0, h, d)
                stream[r0:r1, q0:q1] += self.linear_o((o * g).reshape(r, q1 - q0, h * d))


class GlobalAttention(nn.Module):
    """OpenFold's `GlobalAttention` (extra-MSA column attention: one query per column)."""

    def __init__(self, c_in: int, c_hidden: int, heads: int) -> None:
        super().__init__()
        self.c_hidden, self.heads = c_hidden, heads
        self.linear_q = _linear(c_in, c_hidden * heads, bias=False)
        self.linear_k = _linear(c_in, c_hidden, bias=False)
        self.linear_v = _linear(c_in, c_hidden, bias=False)
        self.linear_g = _linear(c_in, c_hidden * heads)
        self.linear_o = _linear(c_hidden * heads, c_in)

    def update_rows_(self, stream: torch.Tensor, norm: nn.Module, mask: torch.Tensor, inf: float, eps: float,
                     plan_rows: int) -> None:
        n_rows, length, _ = stream.shape
        h, d = self.heads, self.c_hidden
        for r0, r1 in blocks(n_rows, plan_rows):
            x = norm(stream[r0:r1])
            msk = mask[r0:r1].to(x.dtype)
            q = (x * msk[..., None]).sum(dim=-2) / (msk.sum(dim=-1)[..., None] + eps)
            q = (self.linear_q(q) * d ** -0.5).view(r1 - r0, h, d)
            a = torch.matmul(q, self.linear_k(x).transpose(-1, -2))
            a += (inf * (msk - 1))[:, None, :]
            o = torch.matmul(torch.softmax(a, dim=-1), self.linear_v(x))
            g = torch.sigmoid(self.linear_g(x)).view(r1 - r0, length, h, d)
            stream[r0:r1] += self.linear_o((o.unsqueeze(-3) * g).reshape(r1 - r0, length, h * d))


class Transition(nn.Module):
    """OpenFold's MSA and pair transitions: LayerNorm, Linear to n x C, ReLU, Linear back."""

    def __init__(self, c: int, n: int) -> None:
        super().__init__()
        self.layer_norm = LayerNorm(c)
        self.linear_1 = _linear(c, n * c)
        self.linear_2 = _linear(n * c, c)

    def update_rows_(self, stream: torch.Tensor, mask: torch.Tensor | None, plan_rows: int) -> None:
        for r0, r1 in blocks(stream.shape[0], plan_rows):
            x = stream[r0:r1]
            u = self.linear_2(torch.relu(self.linear_1(self.layer_norm(x))))
            if mask is not None:
                u *= mask[r0:r1, :, None].to(u.dtype)
            x += u


class OuterProductMean(nn.Module):
    def __init__(self, c_m: int, c_z: int, c_hidden: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        self.layer_norm = LayerNorm(c_m)
        self.linear_1 = _linear(c_m, c_hidden)
        self.linear_2 = _linear(c_m, c_hidden)
        self.linear_out = _linear(c_hidden * c_hidden, c_z)

    def update_(self, st: "_State") -> None:
        """z += the outer product mean of m over sequences. m is split by residues; the rows of
        the update are this rank's rows of z (layout R: a's residues; T: b's)."""
        st.msa_layout("N")
        m, mask = st.m, st.msa_mask_local()
        mk = mask[..., None].to(m.dtype)
        ln = self.layer_norm(m)
        a, b = self.linear_1(ln) * mk, self.linear_2(ln) * mk
        del ln
        full_mask = st.msa_mask.to(m.dtype)
        transposed = st.z_layout == "T"
        local, other = (b, st.ax.gather(a, dim=1)) if transposed else (a, st.ax.gather(b, dim=1))
        spec = "sje,sic->jice" if transposed else "sic,sje->ijce"
        for r0, r1 in blocks(local.shape[1], st.plan.rows):
            outer = torch.einsum(spec, local[:, r0:r1], other)
            outer = self.linear_out(outer.reshape(outer.shape[:2] + (-1,)))
            norm = torch.einsum("sr,sn->rn", mk[:, r0:r1, 0], full_mask) + self.eps
            outer /= norm[..., None]
            st.z[r0:r1] += outer


class TriangleMultiplication(nn.Module):
    """OpenFold's triangle multiplicative update (outgoing or incoming edges)."""

    def __init__(self, c_z: int, c_hidden: int, outgoing: bool) -> None:
        super().__init__()
        self.outgoing = outgoing
        self.c_hidden = c_hidden
        self.linear_a_p = _linear(c_z, c_hidden)
        self.linear_a_g = _linear(c_z, c_hidden)
        self.linear_b_p = _linear(c_z, c_hidden)
        self.linear_b_g = _linear(c_z, c_hidden)
        self.linear_g = _linear(c_z, c_z)
        self.linear_z = _linear(c_hidden, c_z)
        self.layer_norm_in = LayerNorm(c_z)
        self.layer_norm_out = LayerNorm(c_hidden)

    def _projection(self, side: str, zl: torch.Tensor, mask: torch.Tensor, c: slice) -> torch.Tensor:
        p, g = getattr(self, f"linear_{side}_p"), getattr(self, f"linear_{side}_g")
        out = torch.sigmoid(F.linear(zl, g.weight[c], g.bias[c]))
        out *= F.linear(zl, p.weight[c], p.bias[c])
        out *= mask
        return out

    def update_(self, st: "_State") -> None:
        """Outgoing: x[i, j] = sum_k a[i, k] b[j, k] on rows of z (layout R). Incoming:
        x[i, j] = sum_k a[k, i] b[k, j], which on rows of z^T (layout T) reads
        x^T[j, i] = sum_k b^T[j, k] a^T[i, k]: the same product with the roles of a and b
        swapped. The local side's rows are this rank's; the other side is gathered, a block of
        channels at a time, into a channel-first buffer x [C, rows, N]."""
        st.pair_layout("R" if self.outgoing else "T")
        if st.ax.size == 1 and st.plan.strips > 1:
            return self._update_strips(st)
        z, mask = st.z, st.pair_mask_local()
        rows, n = z.shape[:2]
        x = z.new_empty(self.c_hidden, rows, n)
        for c0, c1 in blocks(self.c_hidden, st.plan.channels):
            local, other = self._sides(z, mask, 0, st.plan.rows, slice(c0, c1))
            other = st.ax.gather(other, dim=1)
            torch.matmul(local, other.transpose(1, 2), out=x[c0:c1])
            del local, other
        for r0, r1 in blocks(rows, st.plan.rows):
            z[r0:r1] += self._delta(z[r0:r1], x[:, r0:r1])

    def _sides(self, z: torch.Tensor, mask: torch.Tensor, start: int, step: int, c: slice):
        """The two projections of z's rows from `start` on, channels `c`, channel-first."""
        mine, theirs = ("a", "b") if self.outgoing else ("b", "a")
        rows, n = z.shape[0] - start, z.shape[1]
        local = z.new_empty(c.stop - c.start, rows, n)
        other = z.new_empty(c.stop - c.start, rows, n)
        for r0, r1 in blocks(rows, step):
            zl = self.layer_norm_in(z[start + r0:start + r1])
            mk = mask[start + r0:start + r1, :, None].to(zl.dtype)
            local[:, r0:r1] = self._projection(mine, zl, mk, c).permute(2, 0, 1)
            other[:, r0:r1] = self._projection(theirs, zl, mk, c).permute(2, 0, 1)
            del zl
        return local, other

    def _delta(self, z_part: torch.Tensor, x_part: torch.Tensor) -> torch.Tensor:
        """The update of the positions `z_part` (old values) from their products `x_part` [C, ...]."""
        gate = torch.sigmoid(self.linear_g(self.layer_norm_in(z_part)))
        gate *= self.linear_z(self.layer_norm_out(x_part.permute(1, 2, 0)))
        return gate

    def _update_strips(self, st: "_State") -> None:
        """The same update with the product made a strip of rows at a time (one process), so that
        the whole product x is never held: step t computes every product tile that involves strip
        S_t and not an earlier strip, x[S_t, S_t...] and x[later, S_t]. After it, no later tile
        reads S_t's rows, so their update is written at once; the updates of later rows at S_t's
        columns wait (at most about a quarter of z; in a file where the plan says `spill`) until
        their own strip is done. Each step projects the rows not yet done again: more arithmetic
        for less memory."""
        z, mask, plan = st.z, st.pair_mask_local(), st.plan
        n = z.shape[0]
        waiting = st.spill if st.spill is not None else HeldUpdates()
        strips = strip_spans(n, plan.strips)
        for t, (s0, s1) in enumerate(strips):
            size = s1 - s0
            xa = z.new_empty(self.c_hidden, size, n - s0)     # x[S_t, s0:]
            xb = z.new_empty(self.c_hidden, n - s1, size)     # x[s1:, S_t]
            for c0, c1 in blocks(self.c_hidden, plan.channels):
                local, other = self._sides(z, mask, s0, plan.rows, slice(c0, c1))
                torch.matmul(local[:, :size], other.transpose(1, 2), out=xa[c0:c1])
                torch.matmul(local[:, size:], other[:, :size].transpose(1, 2), out=xb[c0:c1])
                del local, other
            for r0, r1 in blocks(size, plan.rows):         # S_t is read by no later tile: update it
                z[s0 + r0:s0 + r1, s0:] += self._delta(z[s0 + r0:s0 + r1, s0:], xa[:, r0:r1])
            del xa
            for c, update in waiting.take(t):
                z[s0:s1, strips[c][0]:strips[c][1]] += update
                del update
            for u, (u0, u1) in enumerate(strips[t + 1:], start=t + 1):
                update = z.new_empty(u1 - u0, size, z.shape[2])
                for r0, r1 in blocks(u1 - u0, plan.rows):
                    r0, r1 = r0 + u0, r1 + u0
                    update[r0 - u0:r1 - u0] = self._delta(z[r0:r1, s0:s1], xb[:, r0 - s1:r1 - s1])
                waiting.put(u, t, update)
                del update
            del xb


class TriangleAttention(nn.Module):
    """OpenFold's triangle attention; the ending-node one runs on rows of z^T."""

    def __init__(self, c_z: int, c_hidden: int, heads: int, starting: bool) -> None:
        super().__init__()
        self.starting = starting
        self.layer_norm = LayerNorm(c_z)
        self.linear = _linear(c_z, heads, bias=False)
        self.mha = Attention(c_z, c_hidden, heads)

    def update_(self, st: "_State") -> None:
        st.pair_layout("R" if self.starting else "T")
        bias = st.pair_bias(self.layer_norm, self.linear, of_z=False)
        self.mha.update_rows_(st.z, self.layer_norm, st.pair_mask_local(), bias, st.inf, st.plan.rows,
                              st.plan.queries)


class MSARowAttention(nn.Module):
    """Row attention over residues with a bias from the pair representation (OpenFold's
    `MSARowAttentionWithPairBias`)."""

    def __init__(self, c_m: int, c_z: int, c_hidden: int, heads: int) -> None:
        super().__init__()
        self.layer_norm_m = LayerNorm(c_m)
        self.layer_norm_z = LayerNorm(c_z)
        self.linear_z = _linear(c_z, heads, bias=False)
        self.mha = Attention(c_m, c_hidden, heads)

    def update_(self, st: "_State") -> None:
        bias = st.pair_bias(self.layer_norm_z, self.linear_z, of_z=True)
        st.msa_layout("S")
        self.mha.update_rows_(st.m, self.layer_norm_m, st.msa_mask_local(), bias, st.inf, st.plan.msa_rows,
                              st.plan.queries)


class _MSAColumnCore(nn.Module):
    def __init__(self, c_m: int, c_hidden: int, heads: int) -> None:
        super().__init__()
        self.layer_norm_m = LayerNorm(c_m)
        self.mha = Attention(c_m, c_hidden, heads)


class MSAColumnAttention(nn.Module):
    def __init__(self, c_m: int, c_hidden: int, heads: int) -> None:
        super().__init__()
        self._msa_att = _MSAColumnCore(c_m, c_hidden, heads)

    def update_(self, st: "_State") -> None:
        st.msa_layout("N")
        core = self._msa_att
        core.mha.update_rows_(st.m.transpose(0, 1), core.layer_norm_m, st.msa_mask_local().t(), None, st.inf,
                              st.plan.rows, st.plan.queries)


class MSAColumnGlobalAttention(nn.Module):
    def __init__(self, c_m: int, c_hidden: int, heads: int) -> None:
        super().__init__()
        self.layer_norm_m = LayerNorm(c_m)
        self.global_attention = GlobalAttention(c_m, c_hidden, heads)

    def update_(self, st: "_State") -> None:
        st.msa_layout("N")
        self.global_attention.update_rows_(st.m.transpose(0, 1), self.layer_norm_m, st.msa_mask_local().t(),
                                           st.inf, st.eps, st.plan.rows)


class BlockCore(nn.Module):
    """What an Evoformer block and an extra-MSA block share, after the MSA attentions."""

    def __init__(self, c_m: int, c_z: int, c_hidden_opm: int, c_hidden_mul: int, c_hidden_pair_att: int,
                 heads_pair: int, transition_n: int) -> None:
        super().__init__()
        self.msa_transition = Transition(c_m, transition_n)
        self.outer_product_mean = OuterProductMean(c_m, c_z, c_hidden_opm)
        self.tri_mul_out = TriangleMultiplication(c_z, c_hidden_mul, outgoing=True)
        self.tri_mul_in = TriangleMultiplication(c_z, c_hidden_mul, outgoing=False)
        self.tri_att_start = TriangleAttention(c_z, c_hidden_pair_att, heads_pair, starting=True)
        self.tri_att_end = TriangleAttention(c_z, c_hidden_pair_att, heads_pair, starting=False)
        self.pair_transition = Transition(c_z, transition_n)

    def update_(self, st: "_State") -> None:
        st.msa_layout("N")
        self.msa_transition.update_rows_(st.m.transpose(0, 1), st.trans_mask(st.msa_mask_local().t()),
                                         st.plan.rows)
        for op in (self.outer_product_mean, self.tri_mul_out, self.tri_mul_in, self.tri_att_start, self.tri_att_end):
            st.settle()
            op.update_(st)
        st.settle()
        self.pair_transition.update_rows_(st.z, st.trans_mask(st.pair_mask_local()), st.plan.rows)
        st.settle()


class Block(nn.Module):
    """One Evoformer block (column attention) or extra-MSA block (global column attention)."""

    def __init__(self, dims: dict, extra: bool) -> None:
        super().__init__()
        c_m, c_z, c_att, heads = dims["c_m"], dims["c_z"], dims["c_hidden_msa_att"], dims["no_heads_msa"]
        self.msa_att_row = MSARowAttention(c_m, c_z, c_att, heads)
        self.msa_att_col = (MSAColumnGlobalAttention if extra else MSAColumnAttention)(c_m, c_att, heads)
        self.core = BlockCore(c_m, c_z, dims["c_hidden_opm"], dims["c_hidden_mul"], dims["c_hidden_pair_att"],
                              dims["no_heads_pair"], dims["transition_n"])

    def update_(self, st: "_State") -> None:
        self.msa_att_row.update_(st)
        st.settle()
        self.msa_att_col.update_(st)
        st.settle()
        self.core.update_(st)


class _State:
    """The representations as this rank holds them during a stack, and where each is split."""

    def __init__(self, m, z, msa_mask, pair_mask, ax: Axial, plan: Plan, inf: float, eps: float,
                 mask_trans: bool, spill: WaitingUpdates | None = None) -> None:
        self.ax, self.plan, self.inf, self.eps, self.mask_trans = ax, plan, inf, eps, mask_trans
        self.spill = spill                     # where the strip triangle multiplication's waiting updates go
        s, n = m.shape[:2]
        sp, np_ = ax.padded(s), ax.padded(n)
        self.msa_mask = F.pad(msa_mask, (0, np_ - n, 0, sp - s))    # whole (padded); small
        self.pair_mask = F.pad(pair_mask, (0, np_ - n, 0, np_ - n))
        self.m, self.m_layout = _local_rows(m, ax, sp, np_), "S"
        if isinstance(z, PairRows):            # already this rank's rows, padded
            z.clear_padding_()
            self.z = z.local
        else:
            self.z = _local_rows(z, ax, np_, np_)
        self.z_layout = "R"

    def settle(self) -> None:
        """Between operations on the host: the heap's freed holes go back to the OS, so that one
        operation's small temporaries do not stay resident under the next (measured at 384
        residues in 4-row blocks: 15.5 MiB retained by the end of a block without, 3.5 with)."""
        if self.z.device.type == "cpu":
            trim_heap()

    def msa_layout(self, layout: str) -> None:
        if layout != self.m_layout:
            split, join = (1, 0) if layout == "N" else (0, 1)
            self.m = self.ax.swap(self.m, split=split, join=join)
            self.m_layout = layout

    def pair_layout(self, layout: str) -> None:
        if layout != self.z_layout:
            self.z = self.ax.transpose_rows(self.z, self.plan.rows)
            self.z_layout = layout

    def msa_mask_local(self) -> torch.Tensor:
        return self.ax.local(self.msa_mask, 0 if self.m_layout == "S" else 1)

    def pair_mask_local(self) -> torch.Tensor:
        mask = self.pair_mask if self.z_layout == "R" else self.pair_mask.t()
        return self.ax.local(mask, 0)

    def trans_mask(self, mask: torch.Tensor) -> torch.Tensor | None:
        return mask if self.mask_trans else None

    def pair_bias(self, norm: nn.Module, linear: nn.Linear, of_z: bool) -> torch.Tensor:
        """linear(norm(.)) at every position as [H, N, N], computed from this rank's rows and
        gathered: indexed as z if `of_z`, else as the rows held now (z^T in layout T)."""
        order = (2, 1, 0) if of_z and self.z_layout == "T" else (2, 0, 1)
        rows, n = self.z.shape[:2]
        if self.ax.size == 1:                  # each block goes straight to its place: one [H, N, N]
            bias = self.z.new_empty(linear.out_features, n, n)
            for r0, r1 in blocks(rows, self.plan.rows):
                part = linear(norm(self.z[r0:r1])).permute(*order)
                if order == (2, 0, 1):
                    bias[:, r0:r1] = part
                else:
                    bias[:, :, r0:r1] = part
                del part
            return bias
        # Several ranks: each head's [N, N] plane is gathered straight into its place, so the
        # whole bias is held once (a gather of all heads, then the permute, would hold it twice).
        local = self.z.new_empty(linear.out_features, rows, n)
        for r0, r1 in blocks(rows, self.plan.rows):
            local[:, r0:r1] = linear(norm(self.z[r0:r1])).permute(2, 0, 1)
        bias = self.z.new_empty(linear.out_features, rows * self.ax.size, n)
        for head in range(linear.out_features):
            all_gather_into(bias[head].view(-1), local[head].view(-1), self.ax.axis)
            if order == (2, 1, 0):
                transpose_square_(bias[head], self.plan.rows)
        return bias

    def finish(self, m_out: torch.Tensor, z_out) -> PairRows | None:
        """Write the whole m (layout S) into the caller's tensor, and z (layout R): into the
        caller's whole z, or, given `PairRows`, as this rank's rows (returned)."""
        self.msa_layout("S")
        self.pair_layout("R")
        rows = PairRows(self.z, self.ax, z_out.n) if isinstance(z_out, PairRows) else None
        if self.ax.size == 1:
            return rows                                              # updated in place all along
        m_full = self.ax.gather(self.m, dim=0)
        m_out.copy_(m_full[: m_out.shape[0], : m_out.shape[1]])
        del m_full
        if rows is None:
            z_full = self.ax.gather(self.z, dim=0)
            z_out.copy_(z_full[: z_out.shape[0], : z_out.shape[1]])
        return rows


class Stack(nn.Module):
    """Loom's stand-in for OpenFold's `EvoformerStack` (extra=False, returns m, z, s) or
    `ExtraMSAStack` (extra=True, returns z), called exactly as OpenFold calls those. z is a whole
    tensor (split and gathered back here under axial parallelism) or this rank's `PairRows`,
    taken and returned as rows: the whole z is then never held."""

    def __init__(self, dims: dict, blocks: int, extra: bool, c_s: int | None, inf: float, eps: float) -> None:
        super().__init__()
        self.dims, self.extra, self.inf, self.eps = dict(dims), extra, inf, eps
        self.blocks = nn.ModuleList(Block(dims, extra) for _ in range(blocks))
        if not extra:
            self.linear = _linear(dims["c_m"], c_s)
        self.ax = Axial()
        self.budget: int | None = None         # bytes per process; None = what is free less UNMODELLED or 10%
        self.plan: Plan | None = None          # fixed blocks (overrides the budget)
        self.spill_dir: str | None = None      # a folder the waiting updates may go to (one process)
        self.last_plan: Plan | None = None
        self.spilled_bytes = 0                 # written to spill_dir by this stack so far

    def configure(self, ax: Axial, budget: int | None = None, plan: Plan | None = None,
                  spill_dir: str | None = None) -> "Stack":
        self.ax, self.budget, self.plan, self.spill_dir = ax, budget, plan, spill_dir or None
        return self

    def shapes(self, s: int, n: int, bytes_per: int, pair_split: bool = True,
               pair_bytes_per: int = 0) -> Shapes:
        d = self.dims
        return Shapes(s=s, n=n, c_m=d["c_m"], c_z=d["c_z"], heads_msa=d["no_heads_msa"], c_att=d["c_hidden_msa_att"],
                      c_opm=d["c_hidden_opm"], c_mul=d["c_hidden_mul"], heads_pair=d["no_heads_pair"],
                      c_pair_att=d["c_hidden_pair_att"], transition_n=d["transition_n"], extra=self.extra,
                      ranks=self.ax.size, bytes_per=bytes_per, pair_split=pair_split,
                      pair_bytes_per=pair_bytes_per)

    def _plan(self, m: torch.Tensor, z) -> Plan:
        if self.plan is not None:
            return self.plan
        free = free_bytes(z.device)
        used, free = process_bytes(z.device), free - max(int(0.1 * free), UNMODELLED)
        split = isinstance(z, PairRows)
        pair = z.local if split else z
        z_bytes = pair.numel() * pair.element_size()
        mz = m.numel() * m.element_size() + z_bytes             # the plan counts m and z itself
        outside = max(used - mz, 0)                            # weights, inputs, the runtime
        sh = self.shapes(m.shape[0], m.shape[1], m.element_size(), pair_split=split,
                         pair_bytes_per=pair.element_size())
        spill = self.spill_dir is not None
        if self.budget is not None and self.budget <= used:
            # What fits is what the budget leaves besides `outside` (which a shorter sequence
            # shrinks a little too: an estimate on the safe side).
            raise LoomError(f"memory.budget_gb={self.budget / GIB:.2f} is less than the {used / GIB:.2f} GiB this "
                            f"process already holds when the Evoformer starts (weights, inputs, the MSA and pair "
                            f"representations of this {sh.n}-residue sequence); "
                            f"{what_fits(sh, self.budget - outside, spill, outside)}. Raise memory.budget_gb"
                            + (" or fold a shorter sequence" if longest(sh, self.budget - outside, spill) else ""))
        room = free if self.budget is None else min(self.budget - used, free)    # free: within a cgroup's limit too
        # On the host, blocks' temporaries beyond the least they can be are also kept to half this
        # rank's pair rows, so that with more processes (each holding fewer rows) the whole peak
        # shrinks, not only z.
        prefer = (PREFER_GPU_CHUNK if z.device.type == "cuda"
                  else min(PREFER_CPU_CHUNK, max(MIN_CPU_CHUNK, z_bytes // 2)))
        return choose(sh, room + mz, prefer, spill=spill, outside=outside)

    def forward(self, m, z, msa_mask, pair_mask, chunk_size=None, use_lma=False, use_flash=False,
                inplace_safe=False, _mask_trans=True):
        if torch.is_grad_enabled():
            raise LoomError("Loom's Evoformer runs inference only (it updates m and z in place); call the model "
                            "under torch.no_grad(), or train with OpenFold's stacks (model.engine=openfold)")
        lead = m.shape[:-3]
        if math.prod(lead) != 1:
            raise LoomError(f"Loom's Evoformer folds one target at a time; got a batch of shape {tuple(lead)}")
        m3, z3 = m.reshape(m.shape[-3:]), z if isinstance(z, PairRows) else z.reshape(z.shape[-3:])
        msa_mask, pair_mask = msa_mask.reshape(msa_mask.shape[-2:]), pair_mask.reshape(pair_mask.shape[-2:])
        plan = self._plan(m3, z3)
        self.last_plan = plan
        spill = None
        if plan.spill and plan.strips > 1 and self.ax.size == 1:
            if self.spill_dir is None:
                raise LoomError("the plan spills the triangle multiplication's waiting updates but no folder is "
                                "given for them: set memory.spill_dir")
            n = z3.shape[0]
            spill = WaitingUpdates(self.spill_dir, plan.strips, -(-n // plan.strips), z3.shape[-1], z3.dtype)
        try:
            st = _State(m3, z3, msa_mask, pair_mask, self.ax, plan, self.inf, self.eps, _mask_trans, spill)
            for block in self.blocks:
                block.update_(st)
            rows = st.finish(m3, z3)
            del st
        finally:
            if spill is not None:
                self.spilled_bytes += spill.bytes_written
                spill.close()
        if rows is not None:                   # z came and goes as this rank's rows
            z = rows
        if self.extra:
            return z
        return m, z, self.linear(m[..., 0, :, :])


def _local_rows(x: torch.Tensor, ax: Axial, rows: int, cols: int) -> torch.Tensor:
    """This rank's part of x [R, C, ...] split by rows, as if x were first zero-padded to `rows` x
    `cols` (without making that padded copy). One rank: x itself, updated in place."""
    if ax.size == 1:
        return x
    per = rows // ax.size
    part = x[ax.rank * per: (ax.rank + 1) * per]
    return F.pad(part, (0, 0, 0, cols - x.shape[1], 0, per - part.shape[0]))


def _dims(block) -> dict:
    """The channel sizes of an OpenFold Evoformer / extra-MSA block, read from its modules."""
    row, core = block.msa_att_row, block.core
    return {"c_m": row.c_in, "c_z": row.c_z, "c_hidden_msa_att": row.c_hidden, "no_heads_msa": row.no_heads,
            "c_hidden_opm": core.outer_product_mean.c_hidden, "c_hidden_mul": core.tri_mul_out.c_hidden,
            "c_hidden_pair_att": core.tri_att_start.c_hidden, "no_heads_pair": core.tri_att_start.no_heads,
            "transition_n": core.msa_transition.n}


def from_openfold(stack: nn.Module, extra: bool) -> Stack:
    """Loom's stack with the weights of OpenFold's `EvoformerStack` / `ExtraMSAStack` (strict:
    every name and shape must match)."""
    first = stack.blocks[0]
    dims = _dims(first)
    c_s = None if extra else stack.linear.out_features
    eps = first.msa_att_col.eps if extra else 1e-8
    loom = Stack(dims, len(stack.blocks), extra, c_s, inf=first.msa_att_row.inf, eps=eps)
    param = next(stack.parameters())
    loom.to(dtype=param.dtype, device=param.device)
    loom.load_state_dict(stack.state_dict(), strict=True)
    return loom.eval()

"""OpenFold's input and recycling embedders, its invariant point attention and its distogram head,
computed a block of pair rows at a time at inference.

All of them work position by position (or query row by query row), but OpenFold materialises whole
[N, N, ...] intermediates to do it: the relative-position one-hot goes through two int64
[N, N, 65] tensors (each about as large as z itself), the recycling embedder's LayerNorm of z_prev
and its distance-bin projection are each a new z-sized tensor, the new pair embedding is a z of its
own while the previous cycle's z_prev is still held, the structure module keeps a LayerNorm'd copy
of z beside z for all its iterations, each invariant point attention builds [N, N, heads, points, 3]
point differences (about 1.1 z), and the distogram head adds its [N, N, 64] logits to their
transpose (a second copy). With Loom's in-place Evoformer these, not the trunk, would set the peak.
The classes here keep OpenFold's modules, parameters and arithmetic (the same operations per
position, in the same order) and only change how much is computed at once: rows of the pair
representation, ~64 MiB of temporaries per block.

- The input embedder returns its pair embedding deferred (`DeferredPair`): OpenFold adds it to the
  recycled z_prev (`z += z_prev_emb`), and the deferred pair computes its rows into z_prev's storage
  there, so a cycle holds one z, not two. Anything else gets the whole tensor from `.whole()`.
- The recycling update is written into z_prev's own storage (OpenFold drops z_prev right after).
- The structure module's LayerNorm of z is applied to each block of rows as the invariant point
  attention reads it (`NormedRows`), not kept as a copy.
- The distogram logits are computed when read (`DeferredDistogram.whole()`), a block of rows at a
  time and symmetrised in place, tile by tile. They are a training output: inference writes the
  structure, pLDDT and PAE, none of which reads them, and computing them at once would hold them
  (half a z) beside z at the end of the run, the peak once the rest is in row blocks.

`use_row_blocks(model)` switches a model's modules over (their class; names and weights stay);
with gradients enabled, with batch dimensions or with OpenFold's offloading, OpenFold's own code
runs.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from apps.protein.compat import load_openfold
from apps.protein.plan import blocks

BLOCK_BYTES = 64 << 20


def _rows(n: int, width: int, element: int = 4) -> int:
    return max(1, BLOCK_BYTES // max(1, n * width * element))


class DeferredPair:
    """The input embedder's pair embedding, not yet computed: `rows(r0, r1)` computes a block;
    `z_prev_emb += pair` (OpenFold's `add(z, z_prev_emb, inplace=True)` with the operands as it
    names them) writes pair + z_prev_emb into z_prev_emb's storage and returns it."""

    def __init__(self, rows, n: int, step: int, like: torch.Tensor) -> None:
        self.rows, self.n, self.step, self._like = rows, n, step, like
        self.shape = torch.Size((n, n, like.shape[-1]))
        self.dtype, self.device = like.dtype, like.device

    def new_zeros(self, *args, **kwargs) -> torch.Tensor:
        return self._like.new_zeros(*args, **kwargs)

    def __iadd__(self, other: torch.Tensor) -> torch.Tensor:
        if not isinstance(other, torch.Tensor) or other.shape != self.shape:
            return NotImplemented
        for r0, r1 in blocks(self.n, self.step):
            block = other[r0:r1]
            block.copy_(self.rows(r0, r1) + block)           # OpenFold: z = pair; z += z_prev_emb
        return other

    def whole(self) -> torch.Tensor:
        out = self._like.new_empty(self.shape)
        for r0, r1 in blocks(self.n, self.step):
            out[r0:r1] = self.rows(r0, r1)
        return out


class NormedRows:
    """layer_norm(z), a block of rows at a time: `z_normed[r0:r1]`."""

    def __init__(self, norm: torch.nn.Module, z: torch.Tensor) -> None:
        self.norm, self.z, self.shape = norm, z, z.shape

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.norm.normalise(self.z[rows])

    def whole(self) -> torch.Tensor:
        return self.norm.normalise(self.z)


class DeferredDistogram:
    """The distogram head's logits for pair representation `z`, not yet computed: `.whole()`
    computes them (the same as OpenFold's head gives). The app leaves them out of what it writes."""

    def __init__(self, head: torch.nn.Module, z: torch.Tensor) -> None:
        self.head, self.z = head, z
        self.shape = torch.Size((*z.shape[:-1], head.no_bins))

    def whole(self) -> torch.Tensor:
        return self.head.logits(self.z)


def _whole(z):
    return z.whole() if isinstance(z, (DeferredPair, NormedRows)) else z


@functools.lru_cache(maxsize=None)
def _classes():
    load_openfold()
    from openfold.model.embedders import InputEmbedder, RecyclingEmbedder
    from openfold.model.heads import DistogramHead
    from openfold.model.primitives import LayerNorm
    from openfold.model.structure_module import InvariantPointAttention

    class RowBlockInputEmbedder(InputEmbedder):
        def forward(self, tf, ri, msa, inplace_safe=False):
            if not inplace_safe or tf.dim() != 2:
                return super().forward(tf, ri, msa, inplace_safe=inplace_safe)
            tf_emb_i, tf_emb_j = self.linear_tf_z_i(tf), self.linear_tf_z_j(tf)
            ri = ri.type(tf_emb_i.dtype)
            n = ri.shape[-1]
            boundaries = torch.arange(-self.relpos_k, self.relpos_k + 1, device=ri.device)

            def rows(r0: int, r1: int) -> torch.Tensor:
                d = ri[r0:r1, None] - ri[None, :]
                d = torch.argmin(torch.abs(d[..., None] - boundaries), dim=-1)
                one_hot = F.one_hot(d, num_classes=len(boundaries)).float().to(ri.dtype)
                block = self.linear_relpos(one_hot)
                block += tf_emb_i[r0:r1, None, :]
                block += tf_emb_j[None, :, :]
                return block

            tf_m = self.linear_tf_m(tf).unsqueeze(-3).expand(msa.shape[-3], -1, -1)
            step = _rows(n, 8 * len(boundaries))                  # the int64 [rows, N, 65] distances
            return self.linear_msa_m(msa) + tf_m, DeferredPair(rows, n, step, tf_emb_i)

    class RowBlockRecyclingEmbedder(RecyclingEmbedder):
        def forward(self, m, z, x, inplace_safe=False):
            if not inplace_safe or z.dim() != 3:
                return super().forward(m, z, x, inplace_safe=inplace_safe)
            m.copy_(self.layer_norm_m(m))
            bins = torch.linspace(self.min_bin, self.max_bin, self.no_bins, dtype=x.dtype, device=x.device)
            squared = bins ** 2
            upper = torch.cat([squared[1:], squared.new_tensor([self.inf])], dim=-1)
            n = z.shape[0]
            step = _rows(n, z.shape[-1], z.element_size())
            for r0 in range(0, n, step):
                block = z[r0:r0 + step]
                block.copy_(self.layer_norm_z(block))
                d = torch.sum((x[r0:r0 + step, None, :] - x[None, :, :]) ** 2, dim=-1, keepdim=True)
                block += self.linear(((d > squared) * (d < upper)).type(x.dtype))
            return m, z

    class RowBlockInvariantPointAttention(InvariantPointAttention):
        def forward(self, s, z, r, mask, inplace_safe=False, _offload_inference=False, _z_reference_list=None):
            if not inplace_safe or _offload_inference or s.dim() != 2:
                refs = None if _z_reference_list is None else [_whole(t) for t in _z_reference_list]
                return super().forward(s, _whole(z), r, mask, inplace_safe=inplace_safe,
                                        _offload_inference=_offload_inference, _z_reference_list=refs)
            h, n = self.no_heads, s.shape[0]
            q = self.linear_q(s).view(n, h, -1)
            k, v = torch.split(self.linear_kv(s).view(n, h, -1), self.c_hidden, dim=-1)
            q_pts = self._points(self.linear_q_points(s), r).view(n, h, self.no_qk_points, 3)
            kv_pts = self._points(self.linear_kv_points(s), r).view(n, h, -1, 3)
            k_pts, v_pts = torch.split(kv_pts, [self.no_qk_points, self.no_v_points], dim=-2)
            head_weights = self.softplus(self.head_weights).view(1, 1, -1, 1)
            head_weights = head_weights * math.sqrt(1.0 / (3 * (self.no_qk_points * 9.0 / 2)))
            keys = k.permute(1, 2, 0)                                   # [H, C, N]
            values = v.transpose(-2, -3)                                # [H, N, C]
            value_pts = torch.unbind(v_pts.permute(1, 3, 0, 2), dim=-3)  # 3 x [H, N, P_v]
            out = s.new_empty(n, self.linear_out.out_features)
            step = _rows(n, h * self.no_qk_points * 3)                 # the point differences
            for r0 in range(0, n, step):
                r1 = min(r0 + step, n)
                a = torch.matmul(q[r0:r1].permute(1, 0, 2), keys)      # [H, rows, N]
                a *= math.sqrt(1.0 / (3 * self.c_hidden))
                z_rows = z[r0:r1]                                       # NormedRows: normalised here
                a += math.sqrt(1.0 / 3) * self.linear_b(z_rows).permute(2, 0, 1)
                pt_att = q_pts[r0:r1].unsqueeze(-4) - k_pts.unsqueeze(-5)
                pt_att *= pt_att
                pt_att = sum(torch.unbind(pt_att, dim=-1))
                pt_att *= head_weights
                a += (torch.sum(pt_att, dim=-1) * (-0.5)).permute(2, 0, 1)
                del pt_att
                square_mask = self.inf * (mask[r0:r1, None] * mask[None, :] - 1)
                a += square_mask.unsqueeze(-3)
                a = torch.softmax(a, dim=-1)
                o = torch.matmul(a, values).transpose(-2, -3).reshape(r1 - r0, -1)
                o_pt = torch.stack([torch.matmul(a, vp) for vp in value_pts], dim=-3)   # [H, 3, rows, P_v]
                o_pt = r[r0:r1][..., None, None].invert_apply(o_pt.permute(2, 0, 3, 1))
                o_pt_norm = torch.sqrt(torch.sum(o_pt ** 2, dim=-1) + self.eps).reshape(r1 - r0, -1)
                o_pt = o_pt.reshape(r1 - r0, -1, 3)
                o_pair = torch.matmul(a.transpose(-2, -3), z_rows).reshape(r1 - r0, -1)
                out[r0:r1] = self.linear_out(torch.cat((o, *torch.unbind(o_pt, dim=-1), o_pt_norm, o_pair), dim=-1))
            return out

        @staticmethod
        def _points(x, r):
            x = torch.stack(torch.split(x, x.shape[-1] // 3, dim=-1), dim=-1)
            return r[..., None].apply(x)

    class RowBlockLayerNorm(LayerNorm):
        """The structure module's layer_norm_z: at inference on an unbatched z it returns
        `NormedRows`, which the row-block invariant point attention normalises as it reads."""

        def forward(self, x):
            if torch.is_grad_enabled() or x.dim() != 3:
                return super().forward(x)
            return NormedRows(self, x)

        def normalise(self, x):
            return super().forward(x)

    class RowBlockDistogramHead(DistogramHead):
        def _forward(self, z):
            if torch.is_grad_enabled() or z.dim() != 3:
                return super()._forward(z)
            return DeferredDistogram(self, z)

        def logits(self, z):
            n = z.shape[0]
            logits = z.new_empty(n, n, self.no_bins)
            for r0, r1 in blocks(n, _rows(n, z.shape[-1] + self.no_bins, z.element_size())):
                logits[r0:r1] = self.linear(z[r0:r1])
            # logits + logits^T in place, a pair of tiles at a time (t[i, j] = l[i, j] + l[j, i]);
            # a tile of ~8 MiB
            tile = max(1, int((BLOCK_BYTES / 8 / (self.no_bins * z.element_size())) ** 0.5))
            for i0, i1 in blocks(n, tile):
                for j0, j1 in blocks(n, tile):
                    if j0 < i0:
                        continue
                    upper, lower = logits[i0:i1, j0:j1], logits[j0:j1, i0:i1]
                    both = upper + lower.transpose(0, 1)
                    upper.copy_(both)
                    lower.copy_(both.transpose(0, 1))
            return logits

    return (RowBlockInputEmbedder, RowBlockRecyclingEmbedder, RowBlockInvariantPointAttention, RowBlockLayerNorm,
            RowBlockDistogramHead)


def use_row_blocks(model: torch.nn.Module) -> None:
    """Switch `model`'s embedders, structure module pair input, invariant point attention and
    distogram head to the row-block versions."""
    input_cls, recycling_cls, ipa_cls, norm_cls, distogram_cls = _classes()
    model.input_embedder.__class__ = input_cls
    model.recycling_embedder.__class__ = recycling_cls
    model.structure_module.ipa.__class__ = ipa_cls
    model.structure_module.layer_norm_z.__class__ = norm_cls
    model.aux_heads.distogram.__class__ = distogram_cls

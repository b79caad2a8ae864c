"""OpenFold's input and recycling embedders and its invariant point attention, computed a block of
pair rows at a time at inference.

All three work position by position (or query row by query row), but OpenFold materialises whole
[N, N, ...] intermediates to do it: the relative-position one-hot goes through two int64
[N, N, 65] tensors (each about as large as z itself), the recycling embedder's LayerNorm of z_prev
and its distance-bin projection are each a new z-sized tensor, and each invariant point attention
builds [N, N, heads, points, 3] point differences (about 1.1 z). With Loom's in-place Evoformer
these, not the trunk, would set the peak. The classes here keep OpenFold's modules, parameters and
arithmetic (the same operations per position, in the same order) and only change how much is
computed at once: rows of the pair representation, ~64 MiB of temporaries per block. The
recycling update is written into z_prev's own storage (OpenFold drops z_prev right after).

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

BLOCK_BYTES = 64 << 20


def _rows(n: int, width: int, element: int = 4) -> int:
    return max(1, BLOCK_BYTES // max(1, n * width * element))


@functools.lru_cache(maxsize=None)
def _classes():
    load_openfold()
    from openfold.model.embedders import InputEmbedder, RecyclingEmbedder
    from openfold.model.structure_module import InvariantPointAttention

    class RowBlockInputEmbedder(InputEmbedder):
        def forward(self, tf, ri, msa, inplace_safe=False):
            if not inplace_safe or tf.dim() != 2:
                return super().forward(tf, ri, msa, inplace_safe=inplace_safe)
            tf_emb_i, tf_emb_j = self.linear_tf_z_i(tf), self.linear_tf_z_j(tf)
            ri = ri.type(tf_emb_i.dtype)
            n = ri.shape[-1]
            boundaries = torch.arange(-self.relpos_k, self.relpos_k + 1, device=ri.device)
            pair = tf_emb_i.new_empty(n, n, tf_emb_i.shape[-1])
            step = _rows(n, 8 * len(boundaries))                  # the int64 [rows, N, 65] distances
            for r0 in range(0, n, step):
                r1 = min(r0 + step, n)
                d = ri[r0:r1, None] - ri[None, :]
                d = torch.argmin(torch.abs(d[..., None] - boundaries), dim=-1)
                one_hot = F.one_hot(d, num_classes=len(boundaries)).float().to(ri.dtype)
                block = pair[r0:r1]
                block.copy_(self.linear_relpos(one_hot))
                block += tf_emb_i[r0:r1, None, :]
                block += tf_emb_j[None, :, :]
            tf_m = self.linear_tf_m(tf).unsqueeze(-3).expand(msa.shape[-3], -1, -1)
            return self.linear_msa_m(msa) + tf_m, pair

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
                return super().forward(s, z, r, mask, inplace_safe=inplace_safe,
                                        _offload_inference=_offload_inference, _z_reference_list=_z_reference_list)
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
                a += math.sqrt(1.0 / 3) * self.linear_b(z[r0:r1]).permute(2, 0, 1)
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
                o_pair = torch.matmul(a.transpose(-2, -3), z[r0:r1]).reshape(r1 - r0, -1)
                out[r0:r1] = self.linear_out(torch.cat((o, *torch.unbind(o_pt, dim=-1), o_pt_norm, o_pair), dim=-1))
            return out

        @staticmethod
        def _points(x, r):
            x = torch.stack(torch.split(x, x.shape[-1] // 3, dim=-1), dim=-1)
            return r[..., None].apply(x)

    return RowBlockInputEmbedder, RowBlockRecyclingEmbedder, RowBlockInvariantPointAttention


def use_row_blocks(model: torch.nn.Module) -> None:
    """Switch `model`'s embedders and invariant point attention to the row-block versions."""
    input_cls, recycling_cls, ipa_cls = _classes()
    model.input_embedder.__class__ = input_cls
    model.recycling_embedder.__class__ = recycling_cls
    model.structure_module.ipa.__class__ = ipa_cls

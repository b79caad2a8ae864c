"""OpenFold's input and recycling embedders, computed a block of pair rows at a time at inference.

Both build the pair representation position by position, but OpenFold materialises whole
[N, N, ...] intermediates to do it: the relative-position one-hot goes through two int64
[N, N, 65] tensors (each about as large as z itself), and the recycling embedder's LayerNorm of
z_prev and its distance-bin projection are each a new z-sized tensor. With Loom's in-place
Evoformer these, not the trunk, would set the peak. The classes here keep OpenFold's modules,
parameters and arithmetic (the same operations per position, in the same order) and only change
how much is computed at once: rows of the pair representation, ~64 MiB of temporaries per block.
The recycling update is written into z_prev's own storage (OpenFold drops z_prev right after).

`use_row_blocks(model)` switches a model's two embedders over (their class; names and weights
stay); with gradients enabled, or with batch dimensions, OpenFold's own code runs.
"""

from __future__ import annotations

import functools

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

    return RowBlockInputEmbedder, RowBlockRecyclingEmbedder


def use_row_blocks(model: torch.nn.Module) -> None:
    """Switch `model`'s input and recycling embedders to the row-block versions (in place)."""
    input_cls, recycling_cls = _classes()
    model.input_embedder.__class__ = input_cls
    model.recycling_embedder.__class__ = recycling_cls

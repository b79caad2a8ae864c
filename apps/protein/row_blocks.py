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
representation, up to 64 MiB of temporaries per block (an eighth of the pair rows a process holds,
at least 2 MiB, so that blocks shrink with the rows).

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

- The recycling iteration (`RowBlockAlphaFold`) keeps z as `PairRows` (apps.protein.axial) from
  the embedders to the heads: under axial parallelism each process holds only its rows of z, in
  every cycle and between cycles. Each module computes the rows it holds and gathers only what is
  per row: the invariant point attention's outputs [N, C_s], the predicted aligned error [N, N]
  and the TM-score terms [N] (`RowBlockAuxiliaryHeads`; the [N, N, 64] TM logits are deferred like
  the distogram's). One process holds all the rows: the same code, z whole and in place.
- `model.pair_dtype=bfloat16`: z is held in bfloat16; every module here reads it in the weights'
  dtype.

`use_row_blocks(model, ax)` switches a model's modules over (their class; names and weights stay);
with gradients enabled, with batch dimensions, with templates or with OpenFold's offloading,
OpenFold's own code runs.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from apps.protein.axial import Axial, PairRows
from apps.protein.compat import load_openfold
from apps.protein.plan import blocks

BLOCK_BYTES = 64 << 20          # the most one block's temporaries take
MIN_BLOCK_BYTES = 2 << 20       # ... and the least, however few pair rows a process holds


def block_limit(pair_bytes: int | None) -> int:
    """What one block's temporaries may take beside a process's `pair_bytes` of pair rows: an
    eighth of them (so that with p processes, each holding 1/p of z, the blocks shrink with
    them), between MIN_BLOCK_BYTES and BLOCK_BYTES; BLOCK_BYTES when unknown."""
    if pair_bytes is None:
        return BLOCK_BYTES
    return min(BLOCK_BYTES, max(MIN_BLOCK_BYTES, pair_bytes // 8))


def _rows(n: int, width: int, element: int = 4, pair_bytes: int | None = None) -> int:
    return max(1, block_limit(pair_bytes) // max(1, n * width * element))


def _pair_bytes(z) -> int:
    local = z.local if isinstance(z, PairRows) else z
    return local.numel() * local.element_size()


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
    """layer_norm(z), a block of rows at a time: `z_normed[r0:r1]` for rows this process holds
    (global row numbers; z may be a `PairRows`, whose rows [start, stop) these must be)."""

    def __init__(self, norm: torch.nn.Module, z) -> None:
        self.norm = norm
        self.pair = PairRows.of(z)
        self.shape = self.pair.shape

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start = self.pair.start
        rows = self.pair.local[rows.start - start:rows.stop - start, :self.pair.n]
        return self.norm.normalise(rows.to(self.norm.weight.dtype))

    def whole(self) -> torch.Tensor:
        """The whole normalised z (a collective where z is split: every rank calls it)."""
        return self.norm.normalise(self.pair.whole().to(self.norm.weight.dtype))


class DeferredDistogram:
    """The distogram head's logits for pair representation `z`, not yet computed: `.whole()`
    computes them (the same as OpenFold's head gives; where z is split, every rank must call it).
    The app leaves them out of what it writes."""

    def __init__(self, head: torch.nn.Module, z) -> None:
        self.head, self.z = head, z
        self.shape = torch.Size((*z.shape[:-1], head.no_bins))

    def whole(self) -> torch.Tensor:
        return self.head.logits(self.z.whole() if isinstance(self.z, PairRows) else self.z)


class DeferredLogits:
    """A head's per-pair logits `linear(z)` [N, N, bins], not yet computed: `.whole()` computes
    them (every rank, where z is split)."""

    def __init__(self, linear: torch.nn.Module, z: PairRows) -> None:
        self.linear, self.z = linear, z
        self.shape = torch.Size((z.n, z.n, linear.out_features))

    def whole(self) -> torch.Tensor:
        return self.linear(self.z.whole().to(self.linear.weight.dtype))


def _whole(z):
    return z.whole() if isinstance(z, (DeferredPair, NormedRows, PairRows)) else z


@functools.lru_cache(maxsize=None)
def _classes():
    load_openfold()
    from openfold.model.embedders import InputEmbedder, RecyclingEmbedder
    from openfold.model.heads import AuxiliaryHeads, DistogramHead
    from openfold.model.model import AlphaFold
    from openfold.model.primitives import LayerNorm
    from openfold.model.structure_module import InvariantPointAttention
    from openfold.np import residue_constants
    from openfold.utils.feats import atom14_to_atom37, build_extra_msa_feat, pseudo_beta_fn
    from openfold.utils.loss import _calculate_bin_centers, compute_plddt

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
            self.update_rows_(PairRows.of(z), x)
            return m, z

        def update_rows_(self, z: PairRows, x: torch.Tensor, pair: DeferredPair | None = None) -> None:
            """The recycling update of z's rows, written into them (OpenFold's layer_norm_z(z) plus
            the projected distance bins of the previous atoms x), then, given the input embedder's
            `pair`, pair + that: the whole new z of those rows."""
            bins = torch.linspace(self.min_bin, self.max_bin, self.no_bins, dtype=x.dtype, device=x.device)
            squared = bins ** 2
            upper = torch.cat([squared[1:], squared.new_tensor([self.inf])], dim=-1)
            n, width = z.n, z.shape[-1] + (8 * 65 if pair is not None else 0)    # and the pair's distances
            step = _rows(n, width, z.local.element_size(), _pair_bytes(z))
            for r0 in range(z.start, z.stop, step):
                r1 = min(r0 + step, z.stop)
                block = z.local[r0 - z.start:r1 - z.start, :n]
                block.copy_(self.layer_norm_z(block.to(self.layer_norm_z.weight.dtype)))
                d = torch.sum((x[r0:r1, None, :] - x[None, :, :]) ** 2, dim=-1, keepdim=True)
                block += self.linear(((d > squared) * (d < upper)).type(x.dtype))
                if pair is not None:
                    block.copy_(pair.rows(r0, r1) + block)        # OpenFold: z = pair; z += z_prev_emb

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
            # The query rows this process holds (all of them unless z is split over processes):
            # each row's output reads only that row of z; the outputs are gathered.
            pair = z.pair if isinstance(z, NormedRows) else PairRows.of(z)
            out = s.new_zeros(pair.local.shape[0], self.linear_out.out_features)
            step = _rows(n, h * self.no_qk_points * 3, s.element_size(), _pair_bytes(pair))   # point differences
            for r0 in range(pair.start, pair.stop, step):
                r1 = min(r0 + step, pair.stop)
                a = torch.matmul(q[r0:r1].permute(1, 0, 2), keys)      # [H, rows, N]
                a *= math.sqrt(1.0 / (3 * self.c_hidden))
                z_rows = z[r0:r1]                                       # NormedRows: normalised here
                a += math.sqrt(1.0 / 3) * self.linear_b(z_rows).permute(2, 0, 1)
                pt_att = q_pts[r0:r1].unsqueeze(-4) - k_pts.unsqueeze(-5)
                pt_att *= pt_att
                pt_att = sum(torch.unbind(pt_att, dim=-1))
                pt_att *= head_weights
                # out of place, as OpenFold adds it: the attention takes the points' dtype (the
                # frames' float32 where the model runs in bfloat16)
                a = a + (torch.sum(pt_att, dim=-1) * (-0.5)).permute(2, 0, 1)
                del pt_att
                square_mask = self.inf * (mask[r0:r1, None] * mask[None, :] - 1)
                a += square_mask.unsqueeze(-3)
                a = torch.softmax(a, dim=-1)
                o = torch.matmul(a, values.to(a.dtype)).transpose(-2, -3).reshape(r1 - r0, -1)
                o_pt = torch.stack([torch.matmul(a, vp.to(a.dtype)) for vp in value_pts], dim=-3)  # [H, 3, rows, P_v]
                o_pt = r[r0:r1][..., None, None].invert_apply(o_pt.permute(2, 0, 3, 1))
                o_pt_norm = torch.sqrt(torch.sum(o_pt ** 2, dim=-1) + self.eps).reshape(r1 - r0, -1)
                o_pt = o_pt.reshape(r1 - r0, -1, 3)
                o_pair = torch.matmul(a.transpose(-2, -3), z_rows.to(a.dtype)).reshape(r1 - r0, -1)
                both = torch.cat((o, *torch.unbind(o_pt, dim=-1), o_pt_norm, o_pair), dim=-1)
                out[r0 - pair.start:r1 - pair.start] = self.linear_out(both.to(self.linear_out.weight.dtype))
            return pair.gather_rows(out)

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
            logits = z.new_empty(n, n, self.no_bins, dtype=self.linear.weight.dtype)
            for r0, r1 in blocks(n, _rows(n, z.shape[-1] + self.no_bins, z.element_size())):
                logits[r0:r1] = self.linear(z[r0:r1].to(self.linear.weight.dtype))
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

    class RowBlockAuxiliaryHeads(AuxiliaryHeads):
        """OpenFold's heads at inference on an unbatched pair representation: the distogram and
        TM-score logits deferred ([N, N, bins] each: training outputs), the predicted aligned error
        and TM score computed a block of this process's rows at a time and gathered ([N, N] and a
        number)."""

        def forward(self, outputs):
            pair = outputs["pair"]
            if torch.is_grad_enabled() or pair.dim() != 3:
                return super().forward(outputs)
            lddt_logits = self.plddt(outputs["sm"]["single"])
            aux = {"lddt_logits": lddt_logits, "plddt": compute_plddt(lddt_logits),
                   "distogram_logits": self.distogram(pair),
                   "masked_msa_logits": self.masked_msa(outputs["msa"]),
                   "experimentally_resolved_logits": self.experimentally_resolved(outputs["single"])}
            if self.config.tm.enabled:
                aux.update(self._aligned_error(PairRows.of(pair)))
            return aux

        def _aligned_error(self, z: PairRows) -> dict:
            """OpenFold's compute_predicted_aligned_error and compute_tm (all residues weighted
            alike, as its heads call it), row by row: each row's error and TM term read only that
            row's logits."""
            cfg, n = self.config.tm, z.n
            max_bin, no_bins, eps = cfg.get("max_bin", 31), cfg.no_bins, cfg.get("eps", 1e-8)   # OpenFold's defaults
            centers = _calculate_bin_centers(torch.linspace(0, max_bin, steps=no_bins - 1, device=z.device))
            d0 = 1.24 * (max(n, 19) - 15) ** (1.0 / 3) - 1.8
            tm_per_bin = 1.0 / (1 + (centers ** 2) / (d0 ** 2))
            weights = z.local.new_ones(n)
            normed = weights / (eps + weights.sum())
            error = z.local.new_zeros(z.local.shape[0], n)
            per_alignment = z.local.new_zeros(z.local.shape[0])
            step = _rows(n, z.shape[-1] + 3 * no_bins, z.local.element_size(), _pair_bytes(z))
            for r0 in range(z.start, z.stop, step):
                r1 = min(r0 + step, z.stop)
                rows = z.local[r0 - z.start:r1 - z.start, :n].to(self.tm.linear.weight.dtype)
                probs = torch.softmax(self.tm(rows), dim=-1)
                error[r0 - z.start:r1 - z.start] = torch.sum(probs * centers, dim=-1)
                term = torch.sum(probs * tm_per_bin, dim=-1)
                per_alignment[r0 - z.start:r1 - z.start] = torch.sum(term * normed, dim=-1)
            per_alignment = z.gather_rows(per_alignment)
            weighted = per_alignment * weights
            best = (weighted == torch.max(weighted)).nonzero()[0]
            return {"tm_logits": DeferredLogits(self.tm.linear, z), "predicted_tm_score": per_alignment[tuple(best)],
                    "predicted_aligned_error": z.gather_rows(error), "max_predicted_aligned_error": centers[-1]}

    class RowBlockAlphaFold(AlphaFold):
        """OpenFold's AlphaFold whose recycling iteration, at inference on one unbatched target
        without templates, keeps the pair representation as `PairRows` from the embedders to the
        heads: with axial parallelism each process holds its rows of z and no process ever holds
        the whole z. The steps, modules and arithmetic are OpenFold's `iteration`'s; `axial` is
        the process group (one process: z whole, in place)."""

        axial: Axial
        pair_dtype: torch.dtype | None = None       # z's own dtype (model.pair_dtype); None: the model's

        def iteration(self, feats, prevs, _recycle=True):
            if (torch.is_grad_enabled() or feats["target_feat"].dim() != 2 or self.config.template.enabled
                    or self.globals.offload_inference):
                return super().iteration(feats, prevs, _recycle)
            ax = getattr(self, "axial", None) or Axial()
            dtype = next(self.parameters()).dtype
            for k in feats:
                if feats[k].dtype == torch.float32:
                    feats[k] = feats[k].to(dtype=dtype)
            n, n_seq = feats["target_feat"].shape[-2], feats["msa_feat"].shape[-3]
            seq_mask, msa_mask = feats["seq_mask"], feats["msa_mask"]
            pair_mask = seq_mask[..., None] * seq_mask[..., None, :]
            m, pair = self.input_embedder(feats["target_feat"], feats["residue_index"], feats["msa_feat"],
                                          inplace_safe=True)
            m_1_prev, z, x_prev = reversed([prevs.pop() for _ in range(3)])
            if z is None:
                m_1_prev = m.new_zeros((n, self.config.input_embedder.c_m))
                z = PairRows.zeros(ax, n, self.config.input_embedder.c_z, m, dtype=self.pair_dtype)
                x_prev = m.new_zeros((n, residue_constants.atom_type_num, 3))
            x_prev = pseudo_beta_fn(feats["aatype"], x_prev, None).to(dtype=m.dtype)
            m[..., 0, :, :] += self.recycling_embedder.layer_norm_m(m_1_prev)
            self.recycling_embedder.update_rows_(z, x_prev, pair)       # z: this cycle's pair embedding
            del m_1_prev, x_prev, pair
            g = self.globals
            if self.config.extra_msa.enabled:
                a = self.extra_msa_embedder(build_extra_msa_feat(feats))
                z = self.extra_msa_stack(a, z, msa_mask=feats["extra_msa_mask"].to(dtype=m.dtype),
                                         chunk_size=g.chunk_size, use_lma=g.use_lma,
                                         pair_mask=pair_mask.to(dtype=m.dtype), inplace_safe=True,
                                         _mask_trans=self.config._mask_trans)
                del a
            m, z, s = self.evoformer(m, z, msa_mask=msa_mask.to(dtype=m.dtype), pair_mask=pair_mask.to(dtype=m.dtype),
                                     chunk_size=g.chunk_size, use_lma=g.use_lma, use_flash=g.use_flash,
                                     inplace_safe=True, _mask_trans=self.config._mask_trans)
            outputs = {"msa": m[..., :n_seq, :, :], "pair": z, "single": s}
            outputs["sm"] = self.structure_module(outputs, feats["aatype"], mask=feats["seq_mask"].to(dtype=s.dtype),
                                                  inplace_safe=True, _offload_inference=False)
            outputs["final_atom_positions"] = atom14_to_atom37(outputs["sm"]["positions"][-1], feats)
            outputs["final_atom_mask"] = feats["atom37_atom_exists"]
            outputs["final_affine_tensor"] = outputs["sm"]["frames"][-1]
            return outputs, m[..., 0, :, :], z, outputs["final_atom_positions"]

    return {InputEmbedder: RowBlockInputEmbedder, RecyclingEmbedder: RowBlockRecyclingEmbedder,
            InvariantPointAttention: RowBlockInvariantPointAttention, LayerNorm: RowBlockLayerNorm,
            DistogramHead: RowBlockDistogramHead, AuxiliaryHeads: RowBlockAuxiliaryHeads,
            AlphaFold: RowBlockAlphaFold}


def use_row_blocks(model: torch.nn.Module, ax: Axial | None = None) -> None:
    """Switch `model` (OpenFold's AlphaFold) to the row-block versions of its embedders, structure
    module pair input, invariant point attention and heads, and its recycling iteration to the one
    that keeps z as rows split over `ax`'s processes (one process: z whole)."""
    swap = _classes()
    for module in (model, model.input_embedder, model.recycling_embedder, model.structure_module.ipa,
                   model.structure_module.layer_norm_z, model.aux_heads, model.aux_heads.distogram):
        module.__class__ = swap[_base(type(module), swap)]
    model.axial = ax or Axial()


def _base(cls: type, swap: dict) -> type:
    """The OpenFold class of `cls` (itself, or the one a row-block class was made from)."""
    return next(c for c in cls.__mro__ if c in swap)

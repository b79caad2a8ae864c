"""Self-attention over a sequence split across the ranks of the `sp` axis.

Rank r holds tokens [r L/p, (r + 1) L/p) of every sequence, as (batch, heads, L/p, head_dim)
queries, keys and values. Two ways to let every query see every key:

- `ring_attention` (Li et al. 2021, "Sequence Parallelism: Long Sequence Training from System
  Perspective", arXiv 2105.13120): the key/value blocks travel around the ring, p - 1 steps, each
  rank sending its current block on while it computes with it. Scores are softmaxed blockwise with
  a running maximum and sum (the online softmax of Milakov & Gimelshein 2018, as in
  FlashAttention), so no rank ever holds more than an (L/p) x (L/p) score block. Causal masking
  across blocks: a block from a later rank is skipped, the own block gets the triangular mask,
  earlier ones none. Backward sends each block on together with the gradient of its keys and
  values accumulated so far; after a full circle plus one hop that gradient is home.
- `all_to_all_attention` (DeepSpeed-Ulysses, Jacobs et al. 2023, arXiv 2309.14509): one
  all-to-all turns (all heads, L/p tokens) into (heads/p, all L tokens), ordinary attention runs,
  and one all-to-all turns it back. Needs the heads to divide by p.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.distributed.comm import AxisGroup, all_to_all, irecv, isend


def _exchange(block: torch.Tensor, axis: AxisGroup):
    """Start sending `block` to the next rank and receiving the previous rank's; returns the
    works and the receive buffer."""
    block = block.contiguous()
    buf = torch.empty_like(block)
    nxt, prev = (axis.rank + 1) % axis.size, (axis.rank - 1) % axis.size
    works = [isend(block, axis, nxt), irecv(buf, axis, prev)]
    return works, buf, block


def _scores(q, k, scale, diagonal: bool):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if diagonal:
        n, m = s.shape[-2], s.shape[-1]
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, axis: AxisGroup, causal: bool):
        p, r = axis.size, axis.rank
        scale = 1.0 / math.sqrt(q.shape[-1])
        qf = q.float()
        out = torch.zeros_like(qf)
        peak = torch.full(q.shape[:-1], float("-inf"), device=q.device)
        total = torch.zeros(q.shape[:-1], device=q.device)
        block = torch.stack([k, v])
        for step in range(p):
            src = (r - step) % p
            works = None
            if step < p - 1:
                works, incoming, _keep = _exchange(block, axis)
            if not (causal and src > r):
                kb, vb = block[0].float(), block[1].float()
                s = _scores(qf, kb, scale, causal and src == r)
                new_peak = torch.maximum(peak, s.amax(dim=-1))
                correction = torch.exp(peak - new_peak)
                weights = torch.exp(s - new_peak.unsqueeze(-1))
                total = total * correction + weights.sum(dim=-1)
                out = out * correction.unsqueeze(-1) + torch.matmul(weights, vb)
                peak = new_peak
            if works is not None:
                for w in works:
                    w.wait()
                block = incoming
        out = out / total.unsqueeze(-1)
        lse = peak + torch.log(total)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.axis, ctx.causal, ctx.scale = axis, causal, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        axis, causal, scale = ctx.axis, ctx.causal, ctx.scale
        p, r = axis.size, axis.rank
        qf, go = q.float(), grad_out.float()
        delta = (go * out).sum(dim=-1, keepdim=True)
        dq = torch.zeros_like(qf)
        # the travelling block: keys, values and the gradient of both accumulated on the way
        kf = k.float()
        block = torch.stack([kf, v.float(), torch.zeros_like(kf), torch.zeros_like(kf)])
        for step in range(p):
            src = (r - step) % p
            if not (causal and src > r):
                kb, vb = block[0], block[1]
                s = _scores(qf, kb, scale, causal and src == r)
                prob = torch.exp(s - lse.unsqueeze(-1))
                block[3] += torch.matmul(prob.transpose(-1, -2), go)
                dp = torch.matmul(go, vb.transpose(-1, -2))
                ds = prob * (dp - delta)
                dq += torch.matmul(ds, kb) * scale
                block[2] += torch.matmul(ds.transpose(-1, -2), qf) * scale
            if p == 1:
                block = block[2:]
                break
            # p - 1 hops with the keys and values, then one more with the gradients alone: block
            # src's gradient, complete after visiting every rank, reaches its owner
            works, incoming, _keep = _exchange(block if step < p - 1 else block[2:], axis)
            for w in works:
                w.wait()
            block = incoming
        return dq.to(q.dtype), block[0].to(k.dtype), block[1].to(v.dtype), None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, axis: AxisGroup,
                   causal: bool = True, blockwise_on_one_rank: bool = False) -> torch.Tensor:
    """Attention of this rank's queries over every rank's keys and values, (batch, heads, L/p, d).
    On one rank it is torch's attention, unless `blockwise_on_one_rank` asks for this algorithm with
    one L x L block (the baseline the benchmark compares with)."""
    if axis.size == 1 and not blockwise_on_one_rank:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return _RingAttention.apply(q, k, v, axis, causal)


def all_to_all_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, axis: AxisGroup,
                         causal: bool = True) -> torch.Tensor:
    """The same result by two all-to-alls around ordinary attention on heads / p whole sequences."""
    if axis.size == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    q, k, v = (all_to_all(t, axis, scatter_dim=1, gather_dim=2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return all_to_all(y, axis, scatter_dim=2, gather_dim=1)

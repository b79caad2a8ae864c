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
  Where a fused attention kernel that returns the log-sum-exp is at hand (on the CPU, PyTorch's
  flash attention for CPU and its backward), each block runs on it instead (`_FusedRingAttention`):
  a block's output and log-sum-exp merge into the running ones, so no rank holds even an
  (L/p) x (L/p) block of scores, and the backward runs the kernel's own backward on each block with
  the merged output and log-sum-exp, which gives that block's exact share of the gradients. The
  fused ring runs one head at a time (heads are independent), so what travels and what the kernel
  returns per block is one head's: beyond the output and the gradients it must return, a rank
  holds about 1/heads of a block more (at sp = 4 a rank's peak is about 0.24 of one process's
  fused attention, under 1/4 + 15%); where a head's block is under `MESSAGE_MIN` the heads go in
  fewer, larger groups (`ring_head_groups`), as messages that small cost their latency alone. The
  blockwise-matmul path stays as the reference and where no such kernel applies (CUDA tensors in
  this version: said once when chosen).
- `all_to_all_attention` (DeepSpeed-Ulysses, Jacobs et al. 2023, arXiv 2309.14509): one
  all-to-all turns (all heads, L/p tokens) into (heads/p, all L tokens), ordinary attention runs,
  and one all-to-all turns it back. Needs the heads to divide by p.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from core.distributed.comm import AxisGroup, all_to_all, irecv, isend


def _exchange_each(blocks: list[torch.Tensor], axis: AxisGroup):
    """`_exchange` of several blocks, one message each (no stacked copy); returns the works and
    the receive buffers."""
    works, bufs = [], []
    nxt, prev = (axis.rank + 1) % axis.size, (axis.rank - 1) % axis.size
    for block in blocks:
        buf = torch.empty_like(block)
        works += [isend(block, axis, nxt), irecv(buf, axis, prev)]
        bufs.append(buf)
    return works, bufs


def _exchange(block: torch.Tensor, axis: AxisGroup):
    """Start sending `block` to the next rank and receiving the previous rank's; returns the
    works, the receive buffer and the block being sent (keep it until the works are done)."""
    block = block.contiguous()
    works, (buf,) = _exchange_each([block], axis)
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


def _flash(q, k, v, causal: bool):
    """One block's attention output and log-sum-exp (batch, heads, L_q) on the fused CPU kernel."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)


class _FusedRingAttention(torch.autograd.Function):
    """The ring of `_RingAttention` with each block on the fused kernel (see the module's doc).

    The heads run the ring one group at a time (`groups` of them, one head each by default):
    heads are independent, so only the group's keys and values need to travel together. Beyond
    the output, its log-sum-exp and the gradients it returns, a rank then holds one group's
    travelling and incoming blocks and the kernel's per-block results, 1/groups of what a whole
    block would be; the bytes sent are the same, in more messages. Keys and values travel as they
    are (no stacked copy) and blocks merge into the output in place."""

    @staticmethod
    def forward(ctx, q, k, v, axis: AxisGroup, causal: bool, groups: int):
        p, r = axis.size, axis.rank
        out = _sequence_major(q.shape, torch.float32, q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        for heads in _head_slices(q.shape[1], groups):
            o, m = out[:, heads], lse[:, heads]
            qg = q[:, heads]
            block = [k[:, heads].contiguous(), v[:, heads].contiguous()]
            for step in range(p):
                src = (r - step) % p
                works = None
                if step < p - 1:
                    works, incoming = _exchange_each(block, axis)
                if step == 0:                  # the own block: never skipped, it starts the sums
                    part, part_lse = _flash(qg, block[0], block[1], causal)
                    o.copy_(part)
                    m.copy_(part_lse)
                elif not (causal and src > r):
                    part, part_lse = _flash(qg, block[0], block[1], False)
                    part, part_lse = part.float(), part_lse.float()
                    both = torch.logaddexp(m, part_lse)     # merge: weights exp(lse_block - lse_both)
                    o.mul_(torch.exp(m - both).unsqueeze(-1))
                    o.add_(part.mul_(torch.exp(part_lse - both).unsqueeze(-1)))
                    m.copy_(both)
                part = part_lse = None
                if works is not None:
                    for w in works:
                        w.wait()
                    block = incoming
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.axis, ctx.causal, ctx.groups = axis, causal, groups
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        axis, causal = ctx.axis, ctx.causal
        p, r = axis.size, axis.rank
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk, dv = torch.empty_like(dq), torch.empty_like(dq)
        for heads in _head_slices(q.shape[1], ctx.groups):
            qg, go = q[:, heads].float(), grad_out[:, heads].float().contiguous()
            o, m = out[:, heads], lse[:, heads]
            block = [k[:, heads].float().contiguous(), v[:, heads].float().contiguous()]
            for step in range(p):
                src = (r - step) % p
                if step == 0 or not (causal and src > r):
                    # with the merged output and log-sum-exp the kernel's backward gives this
                    # block's exact share: its probabilities exp(s - lse) and the row sums of dO * O
                    # are global
                    dq_b, dk_b, dv_b = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                        go, qg, block[0], block[1], o, m, 0.0, causal and step == 0)
                    if step == 0:              # the own block starts dq and the travelling gradients
                        dq[:, heads].copy_(dq_b)
                        block += [dk_b, dv_b]
                    else:
                        dq[:, heads].add_(dq_b)
                        block[2].add_(dk_b)
                        block[3].add_(dv_b)
                    dq_b = dk_b = dv_b = None
                if p == 1:
                    block = block[2:]
                    break
                # p - 1 hops with the keys and values, then one more with the gradients alone; one
                # tensor at a time (nothing computes meanwhile), so one incoming buffer is held at
                # once, unless they are small: then one round for all (a message's fixed cost rules)
                sent = [t.contiguous() for t in (block if step < p - 1 else block[2:])]
                if sent[0].numel() * sent[0].element_size() < MESSAGE_MIN:
                    works, block = _exchange_each(sent, axis)
                    for w in works:
                        w.wait()
                else:
                    block = []
                    for i in range(len(sent)):
                        works, got = _exchange_each([sent[i]], axis)
                        for w in works:
                            w.wait()
                        sent[i] = None            # sent: gone before the next one comes in
                        block += got
                sent = None
            dk[:, heads].copy_(block[0])
            dv[:, heads].copy_(block[1])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


MESSAGE_MIN = 64 << 10     # bytes: a message below this costs about its fixed cost (gloo, NCCL alike)


def ring_head_groups(heads: int, head_block_bytes: float) -> int:
    """How many rings the fused ring runs its `heads` in, where one head's key block is
    `head_block_bytes`: one head per ring while that is at least `MESSAGE_MIN` (the blocks in flight
    are then 1/heads of a whole block, see `_FusedRingAttention`), fewer and larger groups where
    blocks are small. Each ring costs 2 x (p - 1) messages forward and more backward; with blocks
    of a few KiB (short sequences over many ranks) one head per ring made every step a string of
    latencies, 6x slower, to save a few KiB."""
    return max(1, min(heads, int(heads * head_block_bytes // MESSAGE_MIN)))


def _sequence_major(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty (batch, heads, L, d) tensor laid out as (batch, L, heads, d), as torch's fused
    kernels return their output: a model's `y.transpose(1, 2).reshape(b, L, heads * d)` before the
    output projection is then a view, not a copy that the projection would keep for backward."""
    b, h, length, d = shape
    return torch.empty(b, length, h, d, dtype=dtype, device=device).transpose(1, 2)


def _head_slices(heads: int, groups: int) -> list[slice]:
    """`heads` split into `groups` runs as even as they come."""
    groups = max(1, min(groups, heads))
    edges = [round(i * heads / groups) for i in range(groups + 1)]
    return [slice(a, b) for a, b in zip(edges, edges[1:])]


_SAID = set()


def fused_kernel(q: torch.Tensor) -> str | None:
    """The fused per-block kernel the ring uses for tensors like `q`, or None (the blockwise path)."""
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return "flash attention for CPU"
    return None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, axis: AxisGroup,
                   causal: bool = True, blockwise_on_one_rank: bool = False, fused: bool | None = None,
                   head_groups: int | None = None) -> torch.Tensor:
    """Attention of this rank's queries over every rank's keys and values, (batch, heads, L/p, d).
    On one rank it is torch's attention, unless `blockwise_on_one_rank` asks for the ring with one
    L x L block (the benchmark's baselines). Each block runs on a fused kernel where one applies
    (`fused=None`; True insists, False takes the blockwise-matmul reference). The fused ring runs
    the heads in `head_groups` groups, one ring each: by default one head per ring when there is a
    ring to travel (p > 1) and each head's block is `MESSAGE_MIN` or more (`ring_head_groups`), all
    heads at once on one rank."""
    if axis.size == 1 and not blockwise_on_one_rank:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    kernel = fused_kernel(q)
    if fused is None:
        fused = kernel is not None
        if kernel is None and (q.device.type, q.dtype) not in _SAID:
            _SAID.add((q.device.type, q.dtype))
            if axis.rank == 0:
                print(f"ring attention on {q.device.type} {q.dtype} tensors: no fused kernel that returns the "
                      f"log-sum-exp here, so each block is a matmul of scores (L/p x L/p per rank)", file=sys.stderr)
    elif fused and kernel is None:
        raise ValueError(f"no fused ring-attention kernel for {q.device.type} {q.dtype} tensors")
    if not fused:
        return _RingAttention.apply(q, k, v, axis, causal)
    if head_groups is None:
        head_block = q.shape[0] * q.shape[2] * q.shape[3] * q.element_size()
        head_groups = ring_head_groups(q.shape[1], head_block) if axis.size > 1 else 1
    return _FusedRingAttention.apply(q, k, v, axis, causal, head_groups)


def all_to_all_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, axis: AxisGroup,
                         causal: bool = True) -> torch.Tensor:
    """The same result by two all-to-alls around ordinary attention on heads / p whole sequences."""
    if axis.size == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    q, k, v = (all_to_all(t, axis, scatter_dim=1, gather_dim=2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return all_to_all(y, axis, scatter_dim=2, gather_dim=1)

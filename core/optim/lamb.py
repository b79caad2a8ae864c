"""LAMB: Adam with a layer-wise trust ratio, for training with very large batches.

You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer, Hsieh, "Large Batch
Optimization for Deep Learning: Training BERT in 76 minutes", arXiv:1904.00962, Algorithm 2.

Also home of `layer_norms`, the one batched computation of per-parameter norms that LAMB and
LARS share (and that a distributed caller hooks into). The step of one tensor is `lamb_partner`
(moments and direction), then, once the norms are known, `lamb_apply`: the same functions step
the slices of chunk shards in `core.zero`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from core.optim.norms import sum_of_squares

NormReducer = Callable[[Tensor], Tensor]


def layer_norms(ws: Sequence[Tensor], xs: Sequence[Tensor],
                norm_reducer: NormReducer | None) -> tuple[Tensor, Tensor]:
    """The L2 norms of each tensor in `ws` and in `xs` (two lists of the same length n).

    The squared norms go into one flat vector `[|ws[0]|², ..., |ws[n-1]|², |xs[0]|², ...,
    |xs[n-1]|²]` (length 2n, float64, on the device of `ws[0]`),
    which is passed through `norm_reducer` (if given) before the square root. Returns the two
    halves: the norms of `ws` and the norms of `xs`, each of length n.
    """
    n = len(ws)
    if len(xs) != n:
        raise ValueError(f"layer_norms: {n} weights but {len(xs)} partners")
    if n == 0:
        empty = torch.zeros(0)
        return empty, empty
    device = ws[0].device
    squares = torch.stack([sum_of_squares(t).to(device) for t in (*ws, *xs)])
    if norm_reducer is not None:
        reduced = norm_reducer(squares)
        if not isinstance(reduced, Tensor) or reduced.shape != squares.shape:
            got = tuple(reduced.shape) if isinstance(reduced, Tensor) else type(reduced).__name__
            raise ValueError(f"norm_reducer returned {got}; it must return a tensor of shape {(2 * n,)}")
        squares = reduced
    norms = squares.sqrt()
    return norms[:n], norms[n:]


def lamb_direction(m: Tensor, v: Tensor, w: Tensor, step: int, group: dict) -> Tensor:
    """u = m̂ / (√v̂ + eps) + weight_decay·w, from moments already updated for `step` (a new tensor)."""
    beta1, beta2 = group["betas"]
    m_hat, v_hat = m, v
    if group["bias_correction"]:
        m_hat = m / (1.0 - beta1 ** step)
        v_hat = v / (1.0 - beta2 ** step)
    u = m_hat / (v_hat.sqrt() + group["eps"])
    if group["weight_decay"] != 0.0:
        u.add_(w, alpha=group["weight_decay"])
    return u


def lamb_partner(w: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, group: dict) -> Tensor:
    """Pass 1 of a LAMB step of one tensor: the moments m, v updated in place with the gradient g
    for `step`; returns the direction u, whose norm (with w's) the trust ratio needs."""
    beta1, beta2 = group["betas"]
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    return lamb_direction(m, v, w, step, group)


def lamb_apply(w: Tensor, u: Tensor, w_norm: Tensor, u_norm: Tensor, group: dict) -> None:
    """Pass 2: w = w - lr·trust·u, in place (u is used up)."""
    scale = lamb_scale(w_norm, u_norm, group)
    w.sub_(u.mul_(scale.to(u.device) if isinstance(scale, Tensor) else scale))   # 0-dim: no host sync


def lamb_scale(w_norm: Tensor, u_norm: Tensor, group: dict) -> Tensor | float:
    """The step's multiplier of u: lr·trust for adapted groups (trust = |w| / |u|, 1 if either is 0,
    clamped to max_trust), lr alone for adapt=False groups."""
    if not group["adapt"]:
        return group["lr"]
    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
    if group["max_trust"] is not None:
        ratio = ratio.clamp(0.0, group["max_trust"])
    return ratio * group["lr"]


class LAMB(torch.optim.Optimizer):
    """LAMB (arXiv:1904.00962, Algorithm 2), one trust ratio per parameter tensor.

    For each parameter w with gradient g, at step t (counted per parameter):

        m = b1·m + (1 - b1)·g                  v = b2·v + (1 - b2)·g²
        m̂ = m / (1 - b1^t)                     v̂ = v / (1 - b2^t)     (only if bias_correction)
        u = m̂ / (√v̂ + eps) + weight_decay·w    (decoupled weight decay, the group's)
        trust = |w| / |u|, or 1 if either norm is 0; then at most max_trust (if not None)
        w = w - lr·trust·u

    A param group with `adapt=False` (biases and norm gains; the factory puts them in the
    weight_decay=0 group) takes trust = 1: a plain Adam step with decoupled decay.

    The norm hook. All the squared norms of one step are computed into one flat vector

        [|w_0|², ..., |w_{n-1}|², |u_0|², ..., |u_{n-1}|²]          (length 2n)

    where w_0 ... w_{n-1} are the parameters that have a gradient this step, in the order of
    `param_groups` and of the parameters within each group (adapt=False groups included; their
    entries are unused). `norm_reducer(vector)`, if given, is called exactly once per step and
    must return a tensor of the same shape (it may work in place and return its input); the
    square roots of its result are the norms. Default None: the local sums are the norms.
    A distributed caller whose parameters are split across ranks makes each rank's vector
    hold its shard's partial sums of squares and passes a reducer that all-reduces (sums) the
    vector over those ranks: one collective per step, and every rank sees the full norms.
    Every rank must then step the same parameters in the same order.

    The update keeps one parameter-sized buffer per parameter alive until the norms are known.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, bias_correction: bool = True,
                 max_trust: float | None = None, adapt: bool = True,
                 norm_reducer: NormReducer | None = None) -> None:
        if lr < 0.0:
            raise ValueError(f"LAMB: lr={lr}; allowed: >= 0")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"LAMB: betas={tuple(betas)}; allowed: two numbers in [0, 1)")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"LAMB: eps={eps}, weight_decay={weight_decay}; allowed: >= 0")
        if max_trust is not None and max_trust <= 0.0:
            raise ValueError(f"LAMB: max_trust={max_trust}; allowed: None (no clamp) or > 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_trust=max_trust, adapt=adapt)
        super().__init__(params, defaults)
        self.norm_reducer = norm_reducer

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # pass 1: the moments and the update direction u of every parameter
        stepped: list[tuple[Tensor, Tensor, dict]] = []   # (w, u, group)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                u = lamb_partner(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group)
                stepped.append((p, u, group))
        if not stepped:
            return loss
        # pass 2: all norms at once (through the hook), then the trust-scaled step
        w_norms, u_norms = layer_norms([p for p, _, _ in stepped], [u for _, u, _ in stepped], self.norm_reducer)
        for (p, u, group), w_norm, u_norm in zip(stepped, w_norms, u_norms):
            lamb_apply(p, u, w_norm, u_norm, group)
        return loss

"""CPUAdam: AdamW for parameters wherever they live.

Parameters in CPU memory (offloaded master weights) are updated by the C++ CPU Adam
(`loom_kernels.cpu_adam`: one vectorised OpenMP pass, optionally writing a bf16/fp16 working copy);
parameters on a GPU by torch's fused AdamW. The update is torch.optim.AdamW's (or Adam's with L2
regularisation when `adamw_mode=False`), so results match torch to float rounding. The step of
one host tensor is `adam_update`, which the chunk optimizer (`core.zero`) runs on its shards too.
"""

from __future__ import annotations

from typing import Iterable

import torch

from loom_kernels.cpu_adam import adam_step, load as load_kernel


def adam_update(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, group: dict,
                work: torch.Tensor | None = None, grad_scale: float = 1.0) -> None:
    """One Adam step of one fp32 tensor with its group's hyperparameters, in place (the C++ kernel for
    host tensors, its torch reference elsewhere): AdamW with bias correction unless the group says
    `adamw_mode` / `bias_correction` False. The gradient is taken times `grad_scale`; `work`, if
    given, receives the new weight in its own dtype."""
    beta1, beta2 = group["betas"]
    adam_step(w, g, m, v, work, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
              weight_decay=group["weight_decay"], adamw=group.get("adamw_mode", True), step=step,
              bias_correction=group.get("bias_correction", True), grad_scale=grad_scale)


class CPUAdam(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, adamw_mode: bool = True,
                 bias_correction: bool = True) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adamw_mode=adamw_mode,
                        bias_correction=bias_correction)
        super().__init__(params, defaults)
        if any(p.device.type == "cpu" for g in self.param_groups for p in g["params"]):
            load_kernel()      # a first compile happens now, not inside the first (timed) step

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            # on the parameter's device: torch's fused kernel wants it there, the CPU path reads it
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            device_params, device_grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("CPUAdam does not support sparse gradients")
                state = self._state(p)
                if p.device.type == "cpu":
                    if not p.data.is_contiguous():
                        raise RuntimeError("CPUAdam needs contiguous CPU parameters")
                    state["step"] += 1
                    adam_update(p.data, p.grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"]), group)
                else:
                    device_params.append(p)
                    device_grads.append(p.grad)
                    exp_avgs.append(state["exp_avg"])
                    exp_avg_sqs.append(state["exp_avg_sq"])
                    steps.append(state["step"])
            if device_params:
                if not group["adamw_mode"] or not group["bias_correction"]:
                    raise RuntimeError("CPUAdam on GPU parameters supports AdamW with bias correction only")
                from torch.optim.adamw import adamw as functional_adamw

                functional_adamw(  # increments the step tensors itself
                                 device_params, device_grads, exp_avgs, exp_avg_sqs, [], steps, foreach=False,
                                 capturable=False, differentiable=False, fused=True, grad_scale=None,
                                 found_inf=None, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        return loss

"""CPUAdam: AdamW for parameters wherever they live.

Parameters in CPU memory (offloaded master weights) are updated by the C++ CPU Adam
(`kernels.cpu_adam`: one vectorised OpenMP pass, optionally writing a bf16/fp16 working copy);
parameters on a GPU by torch's fused AdamW. The update is torch.optim.AdamW's (or Adam's with L2
regularisation when `adamw_mode=False`), so results match torch to float rounding.
"""

from __future__ import annotations

from typing import Iterable

import torch

from kernels.cpu_adam import adam_step, load as load_kernel


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
                    adam_step(p.data, p.grad,
                              state["exp_avg"], state["exp_avg_sq"], None, lr=group["lr"], beta1=beta1,
                              beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                              adamw=group["adamw_mode"], step=int(state["step"]),
                              bias_correction=group["bias_correction"])
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

                functional_adamw(  # increments the step tensors itselfdevice_params, device_grads, exp_avgs, exp_avg_sqs, [], steps, foreach=False,
                                 capturable=False, differentiable=False, fused=True, grad_scale=None,
                                 found_inf=None, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        return loss

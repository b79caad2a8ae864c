"""Adam / AdamW on CPU-resident fp32 master weights: a C++ kernel and its torch reference.

`adam_step(...)` updates the master weight and both moments in place and, when given, writes the
bf16/fp16 working copy of the weight in the same pass. The C++ kernel (`cpu_adam.cpp`, OpenMP,
vectorised with -O3 -march=native) is compiled on first use through
`torch.utils.cpp_extension` and cached (per CPU model, since -march=native code is specific to
it); `reference_adam_step` is the same math in plain torch, used by the tests and wherever the
kernel cannot be built.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
_MODULE = None
_FAILED: str | None = None


def _cpu_tag() -> str:
    flags = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features", "model name")):
                flags += line
    except OSError:
        flags = platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def load():
    """The compiled kernel module, or None (with one warning) if it cannot be built here."""
    global _MODULE, _FAILED
    if _MODULE is not None or _FAILED is not None:
        return _MODULE
    from torch.utils.cpp_extension import load as build

    # ninja from the virtual environment is found even when it is not activated.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    source = _HERE / "cpu_adam.cpp"
    name = f"loom_cpu_adam_{hashlib.sha1(source.read_bytes()).hexdigest()[:8]}_{_cpu_tag()}"
    try:
        _MODULE = build(name=name, sources=[str(source)], extra_cflags=["-O3", "-fopenmp", "-march=native", "-fno-math-errno"],
                        extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, ...: fall back to torch
        _FAILED = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(f"the C++ CPU Adam could not be built ({_FAILED}); using the torch reference", stacklevel=2)
    return _MODULE


def reference_adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                        work: torch.Tensor | None, *, lr: float, beta1: float, beta2: float, eps: float,
                        weight_decay: float, adamw: bool, step: int, bias_correction: bool = True,
                        grad_scale: float = 1.0) -> None:
    """The kernel's math in torch (fp32), in place: torch.optim.AdamW's update when adamw is
    True, Adam with L2 regularisation when False."""
    g = grad.float() * grad_scale
    if adamw:
        param.mul_(1.0 - lr * weight_decay)
    elif weight_decay:
        g = g + weight_decay * param
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bc1 = 1.0 - beta1 ** step if bias_correction else 1.0
    bc2 = 1.0 - beta2 ** step if bias_correction else 1.0
    denom = (exp_avg_sq.sqrt() / bc2 ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bc1)
    if work is not None and work.numel():
        work.copy_(param)


def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
              work: torch.Tensor | None = None, *, lr: float, beta1: float = 0.9, beta2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 0.0, adamw: bool = True, step: int,
              bias_correction: bool = True, grad_scale: float = 1.0, use_kernel: bool = True) -> None:
    module = load() if use_kernel and param.device.type == "cpu" else None
    if module is None:
        reference_adam_step(param, grad, exp_avg, exp_avg_sq, work, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, adamw=adamw, step=step, bias_correction=bias_correction,
                            grad_scale=grad_scale)
        return
    empty = torch.empty(0)
    module.adam_step(param, grad.contiguous(), exp_avg, exp_avg_sq, empty if work is None else work,
                     lr, beta1, beta2, eps, weight_decay, adamw, step, bias_correction, grad_scale)


def available() -> bool:
    return load() is not None

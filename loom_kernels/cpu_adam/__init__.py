"""Adam / AdamW on CPU-resident fp32 master weights: a C++ kernel and its torch reference.

`adam_step(...)` updates the master weight and both moments in place and, when given, writes the
bf16/fp16 working copy of the weight in the same pass. The C++ kernel (`cpu_adam.cpp`, OpenMP,
vectorised with -O3 -march=native) is compiled once per machine and cached under torch's extension
folder ($TORCH_EXTENSIONS_DIR, or ~/.cache/torch_extensions/...), under a name that covers the
source, the flags, the torch version and the CPU model (-march=native code is specific to it);
`reference_adam_step` is the same math in plain torch, used by the tests and wherever the kernel
cannot be built.

Compile it ahead, outside anything measured or memory-capped: `python -m loom_kernels.cpu_adam` (the
last step of `make setup`; after a plain `pip install .`, run it once). Otherwise the first
`load()` compiles it (about 20 s on 2 cores) and says so on stderr. How a build that is killed
halfway is kept from blocking every later load, and how concurrent loads compile only once, is
in `loom_kernels/cpu_adam/build.py`.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

from loom_kernels.cpu_adam.build import build_root, load_or_build

_HERE = Path(__file__).resolve().parent
_SOURCE = _HERE / "cpu_adam.cpp"
_CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno"]
_LDFLAGS = ["-fopenmp"]
_LABEL = "loom_kernels.cpu_adam"

_LOCK = threading.Lock()
_MODULE = None
_LIBRARY: Path | None = None
_COMPILE_S: float | None = None
_FAILED: str | None = None
_FAILED_DETAIL: str | None = None


def _cpu_tag() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
    except OSError:
        flags = platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _one_line(e: Exception) -> str:
    """The reason in one line: torch's first line, and the compiler's first error when there is one
    (torch puts ninja's whole output into the message, starting with the command line)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    head = lines[0].split(": [", 1)[0][:300] if lines else ""
    for line in lines[1:]:
        if ("error" in line.lower() or "not found" in line.lower()) and not line.startswith(("FAILED", "ninja:")):
            return f"{type(e).__name__}: {head}: {line[:300]}"
    return f"{type(e).__name__}: {head}"


def kernel_name() -> str:
    """The cache entry's name: a hash of everything the binary depends on (source, flags, torch
    version) and of the CPU model."""
    digest = hashlib.sha1(_SOURCE.read_bytes())
    digest.update(repr((_CFLAGS, _LDFLAGS, torch.__version__)).encode())
    return f"loom_cpu_adam_{digest.hexdigest()[:8]}_{_cpu_tag()}"


def load():
    """The compiled kernel module, or None (with one warning) if it cannot be built here."""
    global _MODULE, _LIBRARY, _COMPILE_S, _FAILED, _FAILED_DETAIL
    with _LOCK:
        if _MODULE is not None or _FAILED is not None:
            return _MODULE
        # ninja from the virtual environment is found even when it is not activated.
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        if not _SOURCE.exists():   # a package built without its package data
            _FAILED = _FAILED_DETAIL = f"its source {_SOURCE} is not installed"
        else:
            name = kernel_name()
            try:
                _MODULE, _LIBRARY, _COMPILE_S = load_or_build(
                    name, [str(_SOURCE)], extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS, label=_LABEL,
                    what="the C++ CPU Adam", expected="about 20 s on 2 cores, once per machine")
            except Exception as e:  # noqa: BLE001 - no compiler, no ninja, ...: fall back to torch
                _FAILED, _FAILED_DETAIL = _one_line(e), f"{type(e).__name__}: {e}"
                if isinstance(e, ImportError) and (build_root() / name).exists():   # a damaged cached build
                    _FAILED += f"; delete the folder {build_root() / name} and run python -m loom_kernels.cpu_adam"
        if _FAILED is not None:
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


def build_report() -> str:
    """One line: where the compiled kernel is, or why there is none."""
    if _MODULE is not None:
        how = f" (compiled in {_COMPILE_S:.0f} s)" if _COMPILE_S is not None else ""
        return f"C++ CPU Adam ready: {_LIBRARY}{how}"
    return f"C++ CPU Adam not available ({_FAILED or 'not loaded yet'}); the torch reference is used"


def failure_detail() -> str | None:
    """Everything known about why the kernel could not be built (the compiler's output included)."""
    return _FAILED_DETAIL

"""The C++ CPU Adam against its torch reference, and the reference against torch.optim."""

import pytest
import torch

from loom_kernels.cpu_adam import adam_step, available, reference_adam_step


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    """Element-wise |a - b| <= rel * (|b| + rms(b)).

    The floor at the tensor's RMS is needed because any two float32 orders of the same
    arithmetic differ by a few ulps of the operands, and where w - lr * update cancels to almost
    zero those ulps are large relative to the result."""
    scale = b.abs() + b.pow(2).mean().sqrt()
    return bool(((a - b).abs() <= rel * scale).all())


def test_reference_is_torch_adamw_and_adam():
    for adamw, cls in ((True, torch.optim.AdamW), (False, torch.optim.Adam)):
        torch.manual_seed(0)
        p = torch.randn(1000, requires_grad=True)
        opt = cls([p], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=False)
        q, m, v = p.detach().clone(), torch.zeros(1000), torch.zeros(1000)
        for step in range(1, 6):
            g = torch.randn(1000)
            p.grad = g.clone()
            opt.step()
            reference_adam_step(q, g, m, v, None, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                                adamw=adamw, step=step)
        assert close(q, p.detach()), cls


@pytest.mark.skipif(not available(), reason="the C++ kernel cannot be built here")
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("work_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adamw", [True, False])
def test_kernel_matches_the_reference(grad_dtype, work_dtype, adamw):
    torch.manual_seed(1)
    n = 100_003                      # not a multiple of any vector width or block
    p = torch.randn(n)
    q = p.clone()
    m1, v1, m2, v2 = (torch.zeros(n) for _ in range(4))
    work = torch.empty(n, dtype=work_dtype) if work_dtype else None
    for step in range(1, 6):
        g = (torch.randn(n) * 512).to(grad_dtype)      # a loss-scaled gradient, unscaled below
        kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, adamw=adamw, step=step,
                  grad_scale=1 / 512)
        adam_step(p, g, m1, v1, work, **kw)
        reference_adam_step(q, g, m2, v2, None, **kw)
    assert close(p, q) and close(m1, m2) and close(v1, v2)
    if work is not None:
        assert torch.equal(work, p.to(work_dtype))    # the copy is the rounded master weight


@pytest.mark.skipif(not available(), reason="the C++ kernel cannot be built here")
def test_kernel_without_bias_correction_and_with_nan_gradients():
    p, q = torch.ones(64), torch.ones(64)
    m1, v1, m2, v2 = (torch.zeros(64) for _ in range(4))
    g = torch.full((64,), 0.5)
    kw = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, adamw=True, step=1,
              bias_correction=False)
    adam_step(p, g, m1, v1, None, **kw)
    reference_adam_step(q, g, m2, v2, None, **kw)
    assert close(p, q)
    g[3] = float("nan")
    work = torch.empty(64, dtype=torch.bfloat16)
    adam_step(p, g, m1, v1, work, **{**kw, "step": 2})
    assert torch.isnan(p[3]) and torch.isnan(work[3].float())   # NaN stays NaN in the bf16 copy

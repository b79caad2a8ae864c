"""The CPU Adam optimizer (optim.name=cpu_adam) trains exactly like torch.optim.AdamW."""

import copy

import torch

from core.optim import CPUAdam, build_optimizer
from core.config import OptimConfig
from tests.core.toy import MLP, toy_data


def _train(make_opt, steps: int = 5):
    torch.manual_seed(0)
    model = MLP(width=32, dropout=0.0)
    opt = make_opt(model)
    x, y = toy_data(64).tensors
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.state_dict(), opt


def test_cpu_adam_matches_torch_adamw_over_steps():
    cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1, betas=[0.9, 0.95])
    ref, _ = _train(lambda m: build_optimizer(cfg, m))
    got, opt = _train(lambda m: build_optimizer(OptimConfig(name="cpu_adam", lr=1e-2, weight_decay=0.1,
                                                           betas=[0.9, 0.95]), m))
    assert isinstance(opt, CPUAdam)
    for k in ref:
        assert torch.linalg.norm(got[k] - ref[k]) <= 1e-6 * torch.linalg.norm(ref[k]), k
    assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_cpu_adam_state_round_trips():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a = CPUAdam(a.parameters(), lr=0.1, weight_decay=0.01)
    x = torch.randn(8, 4)
    a(x).square().mean().backward()
    opt_a.step()
    b.load_state_dict(a.state_dict())
    opt_b = CPUAdam(b.parameters(), lr=0.1, weight_decay=0.01)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as if saved and loaded
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)

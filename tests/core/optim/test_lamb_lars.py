"""LAMB and LARS step exactly as the papers' formulas, written out here one parameter at a time.

LAMB: arXiv:1904.00962, Algorithm 2. LARS: arXiv:1708.03888, Algorithm 1.
"""

import copy
import math

import pytest
import torch
from torch import nn

from core.config import OptimConfig, Recipe, load_recipe
from core.optim import LAMB, LARS, build_optimizer

STEPS = 5
TOL = 1e-6


class Net(nn.Module):
    """Two Linear layers with biases and a LayerNorm; `zero` starts at zeros and `idle` never
    gets a gradient signal (its gradient is exactly zero), for the zero-norm cases."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 3)
        self.zero = nn.Parameter(torch.zeros(3, 3))
        self.idle = nn.Parameter(torch.randn(2, 2))

    def forward(self, x):
        h = self.fc2(torch.tanh(self.norm(self.fc1(x))))
        return h + h @ self.zero + 0.0 * self.idle.sum()


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def loss_of(net: Net) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randn(16, 3, generator=g, dtype=torch.float64)
    return torch.nn.functional.mse_loss(net(x), y)


def groups_of(net: Net, weight_decay: float) -> list[dict]:
    """Decayed matrices (adapted), biases and norm gains (adapt=False), and the idle matrix
    (adapted, no decay: its update direction is exactly zero)."""
    return [
        {"params": [net.fc1.weight, net.fc2.weight, net.zero], "weight_decay": weight_decay},
        {"params": [net.fc1.bias, net.norm.weight, net.norm.bias, net.fc2.bias], "weight_decay": 0.0,
         "adapt": False},
        {"params": [net.idle], "weight_decay": 0.0},
    ]


def sq(t: torch.Tensor) -> float:
    return float((t * t).sum().detach())


# --------------------------------------------------------------------------------------------
# References: the formulas, one parameter at a time, with Python floats for the norms
# --------------------------------------------------------------------------------------------

class RefLAMB:
    def __init__(self, groups, lr, betas, eps, bias_correction, max_trust):
        self.groups, self.lr, self.eps = groups, lr, eps
        self.b1, self.b2 = betas
        self.bias_correction, self.max_trust = bias_correction, max_trust
        self.m, self.v, self.t = {}, {}, 0
        self.raw_trusts = []    # per step: (w norm, u norm, trust before clamping) per adapted parameter

    @torch.no_grad()
    def step(self):
        self.t += 1
        seen = []
        for group in self.groups:
            wd, adapt = group["weight_decay"], group.get("adapt", True)
            for w in group["params"]:
                g = w.grad
                m = self.b1 * self.m.get(w, torch.zeros_like(w)) + (1 - self.b1) * g
                v = self.b2 * self.v.get(w, torch.zeros_like(w)) + (1 - self.b2) * g * g
                self.m[w], self.v[w] = m, v
                if self.bias_correction:
                    m = m / (1 - self.b1 ** self.t)
                    v = v / (1 - self.b2 ** self.t)
                u = m / (torch.sqrt(v) + self.eps) + wd * w
                w_norm, u_norm = math.sqrt(sq(w)), math.sqrt(sq(u))
                trust = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
                if adapt:
                    seen.append((w_norm, u_norm, trust))
                if self.max_trust is not None:
                    trust = min(max(trust, 0.0), self.max_trust)
                if not adapt:
                    trust = 1.0
                w -= self.lr * trust * u
        self.raw_trusts.append(seen)


class RefLARS:
    def __init__(self, groups, lr, momentum, eta, eps):
        self.groups, self.lr, self.momentum, self.eta, self.eps = groups, lr, momentum, eta, eps
        self.buf = {}
        self.local_lrs = []     # per step: (w norm, g norm, local lr) per adapted parameter

    @torch.no_grad()
    def step(self):
        seen = []
        for group in self.groups:
            wd, adapt = group["weight_decay"], group.get("adapt", True)
            for w in group["params"]:
                g = w.grad
                w_norm, g_norm = math.sqrt(sq(w)), math.sqrt(sq(g))
                denominator = g_norm + wd * w_norm + self.eps
                local = self.eta * w_norm / denominator if w_norm > 0 and denominator > 0 else 1.0
                if adapt:
                    seen.append((w_norm, g_norm, local))
                else:
                    local = 1.0
                v = self.momentum * self.buf.get(w, torch.zeros_like(w)) + self.lr * local * (g + wd * w)
                self.buf[w] = v
                w -= v
        self.local_lrs.append(seen)


def run_both(make_opt, make_ref, weight_decay):
    """Train the same net with the optimizer and with the reference; compare after every step."""
    net = make_net()
    ref_net = copy.deepcopy(net)
    opt, ref = make_opt(groups_of(net, weight_decay)), make_ref(groups_of(ref_net, weight_decay))
    start = {k: v.clone() for k, v in net.state_dict().items()}
    for step in range(STEPS):
        for model, o in ((net, opt), (ref_net, ref)):
            for p in model.parameters():
                p.grad = None
            loss_of(model).backward()
            o.step()
        for (name, got), want in zip(net.named_parameters(), ref_net.parameters()):
            assert torch.isfinite(got).all(), (step, name)
            diff = (got - want).abs().max().item()
            assert diff <= TOL, f"step {step}: {name} differs by {diff:.3g}"
    moved = {k: (v - start[k]).abs().max().item() for k, v in net.state_dict().items()}
    return net, ref, moved


# --------------------------------------------------------------------------------------------
# LAMB
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lamb_matches_the_formulas(bias_correction, weight_decay):
    kw = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, bias_correction=bias_correction, max_trust=None)
    net, ref, moved = run_both(lambda g: LAMB(g, **kw), lambda g: RefLAMB(g, **kw), weight_decay)
    assert all(moved[k] > 1e-3 for k in moved if k != "idle"), moved   # every trained tensor took real steps
    assert moved["idle"] == 0.0
    first = ref.raw_trusts[0]
    assert first[2][0] == 0.0 and first[2][2] == 1.0    # `zero` started with |w| = 0: trust 1
    assert first[3][1] == 0.0 and first[3][2] == 1.0    # `idle` has u = 0: trust 1 (and no NaN)
    assert any(abs(t - 1.0) > 0.1 for step in ref.raw_trusts for _, _, t in step)  # the ratio matters


def test_lamb_trust_clamp_binds():
    kw = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, bias_correction=True, max_trust=0.24)
    clamped, ref, _ = run_both(lambda g: LAMB(g, **kw), lambda g: RefLAMB(g, **kw), weight_decay=0.1)
    raw = [t for step in ref.raw_trusts for _, _, t in step]
    assert any(t > 0.24 for t in raw) and any(t < 0.24 for t in raw)   # the clamp binds for some, not all
    kw["max_trust"] = None
    free, _, _ = run_both(lambda g: LAMB(g, **kw), lambda g: RefLAMB(g, **kw), weight_decay=0.1)
    assert max((a - b).abs().max().item() for a, b in zip(clamped.parameters(), free.parameters())) > 1e-3


def test_lamb_zero_parameter_takes_a_plain_adam_step():
    w = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    w.grad = torch.tensor([0.5, -2.0, 1e-3, 3.0], dtype=torch.float64)
    LAMB([w], lr=0.1, eps=1e-6, weight_decay=0.3).step()
    # step 1 with bias correction: m̂ = g, v̂ = g²; u = g / (|g| + eps) + 0.3·0; trust 1
    want = -0.1 * w.grad / (w.grad.abs() + 1e-6)
    assert torch.allclose(w.detach(), want, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# LARS
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_decay, eps", [(0.0, 1e-8), (0.05, 1e-8), (0.05, 0.0)])
def test_lars_matches_the_formulas(weight_decay, eps):
    kw = dict(lr=0.5, momentum=0.9, eps=eps)
    net, ref, moved = run_both(lambda g: LARS(g, trust_coefficient=0.02, **kw),
                               lambda g: RefLARS(g, eta=0.02, **kw), weight_decay)
    assert all(moved[k] > 1e-3 for k in moved if k != "idle"), moved
    assert moved["idle"] == 0.0                         # no gradient, no decay: it never moves
    first = ref.local_lrs[0]
    assert first[2][0] == 0.0 and first[2][2] == 1.0    # `zero` started with |w| = 0: local lr 1
    if eps == 0.0:
        assert first[3][1] == 0.0 and first[3][2] == 1.0    # `idle`: |g| = 0, denominator 0: local lr 1
    assert all(abs(t - 1.0) > 0.1 for _, _, t in first[:2])   # the local lr matters for the real layers


def test_lars_zero_parameter_takes_a_plain_sgd_step():
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    w.grad = torch.tensor([1.0, -2.0, 0.25], dtype=torch.float64)
    LARS([w], lr=0.1, momentum=0.9, weight_decay=0.5, trust_coefficient=0.001).step()
    assert torch.allclose(w.detach(), -0.1 * w.grad, rtol=0, atol=1e-15)   # local lr 1, buffer from 0


# --------------------------------------------------------------------------------------------
# The norm hook
# --------------------------------------------------------------------------------------------

class Recorder:
    def __init__(self, scale_w: float = 1.0, scale_all: float = 1.0):
        self.calls, self.scale_w, self.scale_all = [], scale_w, scale_all

    def __call__(self, vector):
        self.calls.append(vector.clone())
        out = vector * self.scale_all
        out[: len(vector) // 2] *= self.scale_w
        return out


@pytest.mark.parametrize("kind", ["lamb", "lars"])
def test_norm_reducer_sees_one_vector_per_step_in_the_documented_layout(kind):
    net = make_net()
    params = [p for g in groups_of(net, 0.1) for p in g["params"]]
    hook = Recorder()
    opt = (LAMB(groups_of(net, 0.1), lr=0.01, norm_reducer=hook) if kind == "lamb" else
           LARS(groups_of(net, 0.1), lr=0.1, norm_reducer=hook))
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(net).backward()
        w_sq = torch.tensor([sq(p) for p in params], dtype=torch.float64)
        g_sq = torch.tensor([sq(p.grad) for p in params], dtype=torch.float64)
        opt.step()
        assert len(hook.calls) == step + 1
        vector = hook.calls[-1]
        assert vector.shape == (2 * len(params),)
        assert torch.allclose(vector[: len(params)], w_sq, rtol=1e-12, atol=0)   # first half: |w|², group order
        if kind == "lars":
            assert torch.allclose(vector[len(params):], g_sq, rtol=1e-12, atol=0)   # second half: |g|²


def one_step_deltas(make_opt, weight_decay):
    net = make_net()
    before = {k: v.clone() for k, v in net.named_parameters()}
    opt = make_opt(groups_of(net, weight_decay))
    loss_of(net).backward()
    opt.step()
    return {k: (v - before[k]).detach() for k, v in net.named_parameters()}


def test_lamb_norm_reducer_result_sets_the_trust_ratio():
    plain = one_step_deltas(lambda g: LAMB(g, lr=0.01), 0.1)
    # every norm times √2: the ratio |w| / |u| does not change
    both = one_step_deltas(lambda g: LAMB(g, lr=0.01, norm_reducer=Recorder(scale_all=2.0)), 0.1)
    # only the |w|² half times 4: |w| doubles, so does the trust ratio (where it is not the 0-norm fallback)
    w_only = one_step_deltas(lambda g: LAMB(g, lr=0.01, norm_reducer=Recorder(scale_w=4.0)), 0.1)
    for name in plain:
        assert torch.allclose(both[name], plain[name], rtol=1e-9, atol=0), name
    for name in ("fc1.weight", "fc2.weight"):
        assert torch.allclose(w_only[name], 2.0 * plain[name], rtol=1e-9, atol=0), name
    for name in ("zero", "fc1.bias", "norm.weight", "norm.bias", "fc2.bias"):  # |w| = 0, or adapt=False
        assert torch.allclose(w_only[name], plain[name], rtol=1e-9, atol=0), name


def test_lars_norm_reducer_result_sets_the_local_lr():
    kw = dict(lr=0.1, eps=0.0, trust_coefficient=0.01)
    plain = one_step_deltas(lambda g: LARS(g, **kw), weight_decay=0.0)
    w_only = one_step_deltas(lambda g: LARS(g, **kw, norm_reducer=Recorder(scale_w=4.0)), weight_decay=0.0)
    # eta·|w| / |g| with |w| doubled and no decay in the denominator: the local lr (and step) doubles
    for name in ("fc1.weight", "fc2.weight"):
        assert torch.allclose(w_only[name], 2.0 * plain[name], rtol=1e-9, atol=0), name
    for name in ("zero", "fc1.bias", "norm.weight", "norm.bias", "fc2.bias"):
        assert torch.allclose(w_only[name], plain[name], rtol=1e-9, atol=0), name


@pytest.mark.parametrize("opt_class", [LAMB, LARS])
def test_norm_reducer_of_the_wrong_shape_is_refused(opt_class):
    net = make_net()
    opt = opt_class(net.parameters(), lr=0.01, norm_reducer=lambda v: v[:-1])
    loss_of(net).backward()
    with pytest.raises(ValueError, match="norm_reducer"):
        opt.step()


# --------------------------------------------------------------------------------------------
# Recipes and the factory
# --------------------------------------------------------------------------------------------

def test_recipe_selects_lamb_with_plain_steps_for_biases_and_norms():
    cfg = load_recipe(Recipe, None, ["optim.name=lamb", "optim.trust_clamp=10", "optim.bias_correction=false",
                                     "optim.weight_decay=0.02", "optim.lr=0.003", "optim.betas=[0.8,0.9]"])
    net = make_net()
    opt = build_optimizer(cfg.optim, net)
    assert type(opt) is LAMB
    decay, no_decay = opt.param_groups
    assert [id(p) for p in decay["params"]] == [id(p) for p in (net.zero, net.idle, net.fc1.weight, net.fc2.weight)]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in
                                                   (net.fc1.bias, net.norm.weight, net.norm.bias, net.fc2.bias)]
    assert (decay["weight_decay"], decay["adapt"], no_decay["weight_decay"], no_decay["adapt"]) == (0.02, True, 0.0,
                                                                                                    False)
    assert (decay["lr"], decay["betas"], decay["bias_correction"], decay["max_trust"]) == (0.003, (0.8, 0.9),
                                                                                          False, 10.0)
    default = build_optimizer(OptimConfig(name="lamb"), net)
    assert default.param_groups[0]["max_trust"] is None and default.param_groups[0]["bias_correction"] is True


def test_recipe_selects_lars_with_plain_steps_for_biases_and_norms():
    cfg = load_recipe(Recipe, None, ["optim.name=lars", "optim.momentum=0.8", "optim.trust_coefficient=0.02",
                                     "optim.weight_decay=0.01", "optim.lr=2.0"])
    net = make_net()
    opt = build_optimizer(cfg.optim, net)
    assert type(opt) is LARS
    decay, no_decay = opt.param_groups
    assert len(decay["params"]) == 4 and len(no_decay["params"]) == 4
    assert (decay["weight_decay"], decay["adapt"], no_decay["weight_decay"], no_decay["adapt"]) == (0.01, True, 0.0,
                                                                                                    False)
    assert (decay["lr"], decay["momentum"], decay["trust_coefficient"]) == (2.0, 0.8, 0.02)
    assert OptimConfig().trust_coefficient == 0.001


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_state_round_trips(name):
    cfg = OptimConfig(name=name, lr=0.01)
    a = make_net()
    opt_a = build_optimizer(cfg, a)
    loss_of(a).backward()
    opt_a.step()
    b = copy.deepcopy(a)
    opt_b = build_optimizer(cfg, b)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))   # as if saved and loaded
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)

"""core.optim.norms: the gradient norm of a model split and replicated over gloo ranks is the
unsplit model's, and clipping by it is torch.nn.utils.clip_grad_norm_'s.

- 2 ranks, 1D tensor parallelism: parameters split in halves, and parameters held whole by both;
- 4 ranks, 2D tensor parallelism: parameters split over the 2 x 2 grid, and values held by some
  ranks of the group but not all (a bias by the two ranks of a column);
- 4 ranks as dp=2 x tp=2: each rank's tensor-parallel parts cut once more into data-parallel
  slices (as ZeRO shards them), summed over both axes with one all-reduce each; and the chunk
  optimizer's norm under ZeRO-2 with tensor parallelism.

Each time the norm is torch's on the serial model (1e-6), and the data-parallel wrapper's clipped
gradients, gathered, are torch's clipped gradients (1e-6)."""

import torch

from apps.gpt.config import GPTModelConfig
from apps.gpt.model import GPT
from core.booster.plugin import OptimizerWrapper
from core.distributed import Layout, ParallelMesh
from core.distributed.testing import run_distributed
from core.optim.norms import clip_coef, global_norm, replicas
from core.tensor import make_mode
from tests.core.tensor.test_gpt_tensor_parallel import _serial_grads

CFG = GPTModelConfig(n_layer=2, n_head=4, d_model=32, seq_len=16, vocab_size=64, bias=True)


def _backward(model: GPT) -> None:
    g = torch.Generator().manual_seed(2)
    batch = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len + 1), generator=g)
    model.loss(model(batch[:, :-1]), batch[:, 1:]).backward()


def _serial() -> tuple[float, dict]:
    """torch's norm of the unsplit model's gradient, and the gradients clipped to half of it
    (clipping binds)."""
    torch.manual_seed(0)
    model = GPT(CFG)
    _backward(model)
    half = 0.5 * float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), half))
    return norm, _serial_grads(model)


def _split(mesh: ParallelMesh, mode_name: str) -> GPT:
    torch.manual_seed(0)
    serial = GPT(CFG).serial_state_dict()
    model = GPT(CFG, make_mode(mode_name, mesh))
    model.load_serial_state_dict(serial)
    _backward(model)
    return model


def _wrapper_clips(mesh: ParallelMesh, mode_name: str, max_norm: float) -> dict:
    """The data-parallel wrapper's clip_grad_norm on the split model: its norm, the clipped
    gradients in the unsplit layout, the replica counts seen and the tp all-reduces it took."""
    model = _split(mesh, mode_name)
    tp = mesh.axis("tp")
    wrapper = OptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.0), model, tp_axis=tp)
    before = mesh.stats.calls("tp", "all_reduce")
    norm = float(wrapper.clip_grad_norm(max_norm))
    return {"norm": norm, "grads": _serial_grads(model), "calls": mesh.stats.calls("tp", "all_reduce") - before,
            "replicas": sorted({replicas(p, tp) for p in model.parameters()})}


def _on_two_ranks(max_norm):
    return _wrapper_clips(ParallelMesh.build(Layout(tp=2)), "1d", max_norm)


def _on_four_ranks(max_norm):
    out = {"2d": _wrapper_clips(ParallelMesh.build(Layout(tp=4)), "2d", max_norm)}
    mesh = ParallelMesh.build(Layout(dp=2, tp=2))
    model = _split(mesh, "1d")                   # every dp rank: the same gradient
    dp, tp = mesh.axis("dp"), mesh.axis("tp")
    parts = [(p.grad.reshape(-1).chunk(2)[dp.rank], replicas(p, tp)) for p in model.parameters()]
    before = {a: mesh.stats.calls(a, "all_reduce") for a in ("dp", "tp")}
    out["slices"] = float(global_norm(parts, (tp, dp)))
    out["slice_calls"] = {a: mesh.stats.calls(a, "all_reduce") - before[a] for a in ("dp", "tp")}
    out["chunks"] = _chunk_norm(mesh, max_norm)
    return out


def _chunk_norm(mesh: ParallelMesh, max_norm: float) -> float:
    """ZeRO-2 over dp=2 with the 1D model over tp=2: the chunk optimizer's norm before clipping
    (from the squares its gradient shards kept)."""
    from core.booster.zero import ZeroPlugin

    torch.manual_seed(0)
    serial = GPT(CFG).serial_state_dict()
    model = GPT(CFG, make_mode("1d", mesh))
    model.load_serial_state_dict(serial)
    wrapped, opt = ZeroPlugin(mesh, "fp32", stage=2).configure(model, torch.optim.AdamW(model.parameters()))
    g = torch.Generator().manual_seed(2)
    batch = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len + 1), generator=g)
    opt.backward(model.loss(wrapped(batch[:, :-1]), batch[:, 1:]))
    return float(opt.clip_grad_norm(max_norm))


def _rel(a, b) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _check_wrapper(run: dict, norm: float, grads: dict) -> None:
    assert abs(run["norm"] - norm) <= 1e-6 * norm
    assert run["calls"] == 1                               # one all-reduce of one number over tp
    assert run["grads"].keys() == grads.keys()
    for name, g in grads.items():
        assert _rel(run["grads"][name], g) <= 1e-6, name


def test_tensor_parallel_norm_and_clipping_on_two_ranks_match_torch():
    norm, grads = _serial()
    runs = run_distributed(_on_two_ranks, world_size=2, args=(0.5 * norm,))
    for run in runs:
        _check_wrapper(run, norm, grads)
        assert run["replicas"] == [1, 2]                   # values split, and values on both ranks


def test_split_and_sliced_norms_on_four_ranks_match_torch():
    norm, grads = _serial()
    runs = run_distributed(_on_four_ranks, world_size=4, args=(0.5 * norm,))
    for run in runs:
        _check_wrapper(run["2d"], norm, grads)
        assert run["2d"]["replicas"] == [1, 2]             # values split, and values on one row of the grid
        assert abs(run["slices"] - norm) <= 1e-6 * norm
        assert run["slice_calls"] == {"dp": 1, "tp": 1}    # one all-reduce per axis
        assert abs(run["chunks"] - norm) <= 1e-6 * norm


def test_clip_coef_is_torch_factor():
    for norm in (4.0, 1.0, 0.5, 0.0):                      # above, at and under max_norm=1
        grad = torch.full((4,), norm / 2)                  # |grad| = norm
        w = torch.nn.Parameter(torch.zeros(4))
        w.grad = grad.clone()
        torch.nn.utils.clip_grad_norm_([w], 1.0)
        got = grad * clip_coef(torch.linalg.vector_norm(grad), 1.0)
        assert torch.equal(got, w.grad), norm

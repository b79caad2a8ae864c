"""Every tensor-parallel mode (1D over 2 and 4 gloo ranks, 2D over 4, 2.5D over 8 as 2 x 2 x 2, 3D
over 8), in one set of ranks per layout:

- every layer against torch.nn (tests/core/tensor/layer_chain.py);
- the GPT model, written once on core.tensor's layers: logits, loss (vocabulary-parallel, never
  gathered), every gradient and the weights after 3 AdamW steps against the serial model, fp32,
  1e-5; the qkv shards hold whole heads; the serial state dict round trip;
- one GPT block's training step hands the collectives exactly the calls and bytes the cost
  model (core/tensor/cost.py) predicts."""

import pytest
import torch

from apps.gpt.config import GPTModelConfig
from apps.gpt.model import GPT
from core.distributed import Layout, ParallelMesh
from core.distributed.testing import run_distributed
from core.errors import LoomError
from benchmarks.tp_comm_volume import measure_layer
from core.tensor import COLUMN, TPLayer, batch_parts, make_mode
from core.tensor.cost import transformer_layer
from tests.core.tensor.layer_chain import chain_run, check_chain

CFG = GPTModelConfig(n_layer=2, n_head=4, d_model=32, seq_len=16, vocab_size=64, bias=True)
STEPS = 3


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, CFG.vocab_size, (4, CFG.seq_len + 1), generator=g)


def _serial_grads(model: GPT) -> dict[str, torch.Tensor]:
    """Every gradient in the unsplit layout (gathered over the tensor-parallel ranks)."""
    out = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for pname, p in module.named_parameters(recurse=False):
            grad = p.grad
            if isinstance(module, TPLayer):
                grad = module.mode.gather(module.tp_kinds[pname], grad, module.serial_shapes[pname])
            out[prefix + pname] = grad.clone()
    return out


def _expected_qkv(name, w, rank, q, p):
    """The qkv weight's shard as each mode's design places it: whole heads of q, k and v."""
    q_k_v = w.chunk(3, dim=0)
    if name == "1d":
        return torch.cat([t.chunk(p, 0)[rank] for t in q_k_v])
    if name in ("2d", "2.5d"):
        i, j = rank // q % q, rank % q
        return torch.cat([t.chunk(q, 0)[i] for t in q_k_v]).chunk(q, 1)[j]
    a, b, c = rank // (q * q), rank // q % q, rank % q
    return torch.cat([t.chunk(q, 0)[c] for t in q_k_v]).chunk(q, 0)[a].chunk(q, 1)[b]


def _train(model: GPT, logits_full) -> dict:
    batch = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    out = {}
    for step in range(STEPS):
        logits = model(batch[:, :-1])
        loss = model.loss(logits, batch[:, 1:])
        loss.backward()
        if step == 0:
            out.update(logits=logits_full(logits).detach(), loss=loss.item(), grads=_serial_grads(model))
        opt.step()
        opt.zero_grad()
    out["weights"] = model.serial_state_dict()
    return out


def _serial() -> dict:
    torch.manual_seed(0)
    return _train(GPT(CFG), lambda x: x)


def _parallel(name: str, tp: int, depth: int) -> dict:
    mesh = ParallelMesh.build(Layout(tp=tp))
    mode = make_mode(name, mesh, depth)
    # what check_layout refuses before any process joins is what the mode splits
    assert mode.batch_parts == batch_parts(name, tp, depth), (name, mode.batch_parts)
    torch.manual_seed(0)
    serial = GPT(CFG).serial_state_dict()
    torch.manual_seed(123)                   # a different init, overwritten by the serial weights
    model = GPT(CFG, mode)
    model.load_serial_state_dict(serial)
    expected = _expected_qkv(name, serial["blocks.0.attn.qkv.weight"], mode.rank, getattr(mode, "q", tp), tp)
    shard_ok = torch.equal(model.blocks[0].attn.qkv.weight.data, expected)
    round_trip = all(torch.equal(v, serial[k]) for k, v in model.serial_state_dict().items())
    out = _train(model, lambda x: mode.gather_activation(x, COLUMN))
    out.update(shard_ok=shard_ok, round_trip=round_trip, heads=model.blocks[0].attn.n_head)
    return out


def _rel(a, b):
    return float(torch.linalg.norm(a.float() - b.float()) / torch.linalg.norm(b.float()))


LAYOUTS = [("1d", 2, 1), ("1d", 4, 1), ("2d", 4, 1), ("2.5d", 8, 2), ("3d", 8, 1)]


COMM_SHAPE = dict(batch=4, seq=8, hidden=16, heads=4)


def _layout(name: str, tp: int, depth: int):
    bias = name != "2d"                  # the cost model with and without biases
    comm = measure_layer(name, tp, depth, *COMM_SHAPE.values(), bias=bias)
    return chain_run(name, tp, depth), _parallel(name, tp, depth), comm


@pytest.mark.parametrize("mode,tp,depth", LAYOUTS, ids=[f"{n}-tp{t}" for n, t, _ in LAYOUTS])
def test_layers_gpt_and_communication_match_serial_and_the_cost_model(mode, tp, depth):
    results = run_distributed(_layout, world_size=tp, args=(mode, tp, depth))
    check_chain(mode, tp, [r[0] for r in results])
    predicted = transformer_layer(mode, tp, COMM_SHAPE["batch"], COMM_SHAPE["seq"], COMM_SHAPE["hidden"], 4,
                                  depth, bias=mode != "2d")
    for _, _, comm in results:
        assert (comm["calls"], comm["bytes"]) == (predicted.calls, predicted.payload_bytes), comm["by_axis"]
    ref = _serial()
    heads = CFG.n_head // (tp if mode == "1d" else 2)          # q = 2 in the other layouts
    for got in (r[1] for r in results):
        assert got["shard_ok"] and got["round_trip"]
        assert got["heads"] == heads
        assert _rel(got["logits"], ref["logits"]) <= 1e-5
        assert abs(got["loss"] - ref["loss"]) <= 1e-5 * ref["loss"]
        assert got["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            assert _rel(got["grads"][name], g) <= 1e-5, name
        for name, w in ref["weights"].items():
            got_w = got["weights"][name]
            if name.endswith("attn.qkv.bias"):
                # The key bias shifts every score of a query by the same amount, which softmax
                # ignores: its gradient is exactly zero in exact arithmetic, rounding noise here,
                # and Adam's division by sqrt(v) turns any noise into full-size steps. Compare
                # the query and value biases; check the key bias's gradient is noise.
                q, k, v = ref["grads"][name].chunk(3)
                assert torch.linalg.norm(k) <= 1e-6 * torch.linalg.norm(torch.cat([q, v]))
                w, got_w = (torch.cat([t.chunk(3)[0], t.chunk(3)[2]]) for t in (w, got_w))
            assert _rel(got_w, w) <= 1e-5, name


def _bad_heads(name, tp):
    mesh = ParallelMesh.build(Layout(tp=tp))
    try:
        GPT(GPTModelConfig(n_layer=1, n_head=3, d_model=24, seq_len=8, vocab_size=64), make_mode(name, mesh))
    except LoomError as e:
        return str(e)
    return None


@pytest.mark.parametrize("name,tp,says", [
    ("1d", 2, "model.n_head=3 does not split into the 2 parts parallel.tp_mode=1d (1d over 2 ranks) needs; "
              "use a multiple of 2"),
    ("2d", 4, "model.n_head=3 does not split into the 2 parts parallel.tp_mode=2d (2d on a 2 x 2 grid) needs"),
])
def test_heads_that_do_not_split_are_refused(name, tp, says):
    for message in run_distributed(_bad_heads, world_size=tp, args=(name, tp)):
        assert message is not None and message.startswith(says)

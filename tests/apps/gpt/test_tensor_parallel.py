"""The GPT model, written once on core.tensor's layers, split 1D over 2 and 4 gloo ranks: logits,
loss (vocabulary-parallel, never gathered), every gradient and the weights after 3 AdamW steps
against the serial model, fp32, 1e-5; and the serial state dict round trip."""

import pytest
import torch

from apps.gpt.config import GPTModelConfig
from apps.gpt.model import GPT
from core.distributed import Layout, ParallelMesh
from core.distributed.testing import run_distributed
from core.errors import LoomError
from core.tensor import Embedding, Linear, make_mode
from core.tensor.functional import gather_from

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
        if isinstance(module, Linear):
            w, b = module.mode.gather_linear(module.weight.grad, None if module.bias is None else module.bias.grad,
                                             module.role, module.groups)
            out[prefix + "weight"] = w
            if b is not None:
                out[prefix + "bias"] = b
        elif isinstance(module, Embedding):
            out[prefix + "weight"] = module.mode.gather_embedding(module.weight.grad)
        else:
            for pname, p in module.named_parameters(recurse=False):
                out[prefix + pname] = p.grad.clone()
    return out


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


def _parallel(tp: int) -> dict:
    mesh = ParallelMesh.build(Layout(tp=tp))
    mode = make_mode("1d", mesh)
    torch.manual_seed(0)
    serial = GPT(CFG).serial_state_dict()
    torch.manual_seed(123)                   # a different init, overwritten by the serial weights
    model = GPT(CFG, mode)
    model.load_serial_state_dict(serial)
    shard_ok = torch.equal(model.blocks[0].mlp.fc.weight.data, serial["blocks.0.mlp.fc.weight"].chunk(tp, 0)[mode.rank])
    round_trip = all(torch.equal(v, serial[k]) for k, v in model.serial_state_dict().items())
    out = _train(model, lambda x: gather_from(x, mode.axis, -1))
    out.update(shard_ok=shard_ok, round_trip=round_trip, local_vocab=model.lm_head.weight.shape[0])
    return out


def _rel(a, b):
    return float(torch.linalg.norm(a.float() - b.float()) / torch.linalg.norm(b.float()))


@pytest.mark.parametrize("tp", [2, 4])
def test_gpt_one_d_matches_serial(tp):
    ref = _serial()
    for got in run_distributed(_parallel, world_size=tp, args=(tp,)):
        assert got["shard_ok"] and got["round_trip"]
        assert got["local_vocab"] == CFG.vocab_size // tp
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


def _bad_heads():
    mesh = ParallelMesh.build(Layout(tp=2))
    try:
        GPT(GPTModelConfig(n_layer=1, n_head=3, d_model=24, seq_len=8, vocab_size=64), make_mode("1d", mesh))
    except LoomError as e:
        return str(e)
    return None


def test_heads_that_do_not_split_are_refused():
    for message in run_distributed(_bad_heads, world_size=2):
        assert message == "model.n_head=3 does not split over parallel.tp=2; use a tp that divides it"

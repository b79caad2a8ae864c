"""Each Hugging Face plan (GPT-2, Llama with grouped-query attention, OPT) against the unmodified
transformers model, trained in a plain loop on the same tokens from the same folder: tp=2 (1D),
tp=4 (1D and 2D), tp=8 (2.5D and 3D), sp=2 (ring and all-to-all) and pp=2 (1F1B, two
micro-batches; there, the losses, each stage's gradients and the weights): the logits and loss of
the first step, every gradient (in transformers' layout, GPT-2's Conv1D transposed back) and the
weights after 3 steps, fp32, 1e-5.

The optimizer is SGD with momentum and weight decay: Adam divides each element by its own
gradient's scale, so an element whose gradient is rounding noise around zero (the attention's key
bias, whose gradient is exactly zero in exact arithmetic) takes a full-size step in a direction
set by the noise; this test is about the computation (tests/core/tensor explains the same choice).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from core.distributed import Layout, ParallelMesh
from core.distributed.testing import run_distributed
from core.hf import HFCausalLM
from core.sequence import SequenceParallel
from core.tensor import COLUMN, TPLayer, make_mode

STEPS, BATCH, SEQ, VOCAB = 3, 4, 16, 64


def configs() -> dict:
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    common = dict(bos_token_id=0, eos_token_id=0)
    return {
        "gpt2": GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=SEQ, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, **common),
        "llama": LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=8, num_key_value_heads=4,
                             intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=SEQ, **common),
        "opt": OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64, vocab_size=VOCAB,
                         max_position_embeddings=SEQ, word_embed_proj_dim=32, dropout=0.0, pad_token_id=1, **common),
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family's tiny model with random weights, saved by transformers itself."""
    from transformers import AutoModelForCausalLM

    out = {}
    for family, config in configs().items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(family)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        out[family] = str(folder)
    return out


def _batch(step):
    # ids from 2 up: OPT's padding row (1) gets no gradient in nn.Embedding, and none of these tokens
    g = torch.Generator().manual_seed(10 + step)
    return torch.randint(2, VOCAB, (BATCH, SEQ + 1), generator=g)


def _optimizer(params):
    return torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1)


def _reference(folder: str, micro: int = 1) -> dict:
    """The unmodified transformers model, a plain loop; `micro` micro-batches accumulated per step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    opt = _optimizer(model.parameters())
    out = {"losses": []}
    for step in range(STEPS):
        total = 0.0
        for part in _batch(step).chunk(micro):
            logits = model(part[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), part[:, 1:].reshape(-1)) / micro
            loss.backward()
            total += loss.item()
            if step == 0 and micro == 1:
                out["logits"] = logits.detach()
        out["losses"].append(total)
        if step == 0:
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    out["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def _serial_grads(model: HFCausalLM) -> dict:
    """Every gradient unsplit, in transformers' layout (a tied weight under its first name)."""
    out, seen = {}, set()
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            grad = p.grad
            if isinstance(module, TPLayer):
                grad = module.mode.gather(module.tp_kinds[pname], grad, module.serial_shapes[pname])
            full = f"{name}.{pname}"
            out[full] = model.hf_tensor(full, grad.clone())
    return out


def _hf_weights(model: HFCausalLM) -> dict:
    return {n: model.hf_tensor(n, v) for n, v in model.serial_state_dict().items()}


def _train(model: HFCausalLM, gather_logits, after_backward=lambda m: None) -> dict:
    opt = _optimizer(model.parameters())
    out = {"losses": []}
    for step in range(STEPS):
        batch = _batch(step)
        logits = model(batch[:, :-1])
        loss = model.loss(logits, batch[:, 1:])
        loss.backward()
        after_backward(model)
        out["losses"].append(loss.item())
        if step == 0:
            out.update(logits=gather_logits(logits.detach()), grads=_serial_grads(model))
        opt.step()
        opt.zero_grad()
    out["weights"] = _hf_weights(model)
    return out


def _tensor_parallel(folders: dict, layouts: list) -> dict:
    out = {}
    for name, tp, *depth in layouts:
        mesh = ParallelMesh.build(Layout(tp=tp))
        mode = make_mode(name, mesh, *depth)
        for family, folder in folders.items():
            model = HFCausalLM.from_folder(folder, mode)
            out[(name, tp, family)] = _train(model, lambda x: mode.gather_activation(x, COLUMN))
    return out


def _sequence_parallel(folders: dict) -> dict:
    mesh = ParallelMesh.build(Layout(sp=2))
    axis = mesh.axis("sp")
    out = {}

    def gather_tokens(x):
        parts = [torch.empty_like(x) for _ in range(axis.size)]
        dist.all_gather(parts, x.contiguous(), group=axis.group)
        return torch.cat(parts, dim=1)

    def average_over_sp(model):        # what data-parallel averaging over dp x sp does in a run
        for p in model.parameters():
            dist.all_reduce(p.grad, group=axis.group)
            p.grad /= axis.size

    for sp_mode in ("ring", "all_to_all"):
        for family, folder in folders.items():
            model = HFCausalLM.from_folder(folder, seq=SequenceParallel(axis, sp_mode))
            out[(sp_mode, family)] = _train(model, gather_tokens, average_over_sp)
    return out


def _pipelined(folders: dict) -> dict:
    from core.booster import PipelinePlugin

    mesh = ParallelMesh.build(Layout(pp=2))
    out = {}
    for family, folder in folders.items():
        model = HFCausalLM.from_folder(folder)
        plugin = PipelinePlugin(mesh, "fp32", "1f1b", 2, 1, "layers")
        wrapped, opt = plugin.configure(model, _optimizer(model.parameters()))
        losses, grads = [], {}
        for step in range(STEPS):
            loss = plugin.execute_pipeline(list(_batch(step).chunk(2)), wrapped, lambda b: b[:, :-1],
                                           lambda logits, b: model.loss(logits, b[:, 1:]), opt)
            losses.append(float(loss))
            if step == 0:     # this stage's gradients (a tied weight's: summed with the other end's)
                grads = {n: model.hf_tensor(n, p.grad.clone()) for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
        # every stage's weights, gathered onto each rank as the checkpoint gathers them
        weights = {n: model.hf_tensor(n, t) for n, t in plugin.checkpoint_io().sharding.gather(model).items()}
        out[family] = {"losses": losses, "weights": weights, "grads": grads,
                       "stage": sorted({n.split(".")[0] for n, _ in model.named_parameters()})}
        plugin.close()
    return out


def _rel(a, b):
    return float(torch.linalg.norm(a.float() - b.float()) / torch.linalg.norm(b.float()))


def _close(got: dict, ref: dict, what: str) -> None:
    """Each tensor within 1e-5 of the reference, relative to its own norm; or, for a tensor that is
    rounding noise in both (the key bias's gradient is exactly zero in exact arithmetic, 1e-12 here,
    and so the key bias stays at its zero start), within 1e-7 of the norm of all of them."""
    total = torch.linalg.norm(torch.stack([torch.linalg.norm(t.float()) for t in ref.values()]))
    assert got.keys() >= ref.keys(), (what, sorted(ref.keys() - got.keys()))
    for name, r in ref.items():
        diff = float(torch.linalg.norm(got[name].float() - r.float()))
        assert diff <= 1e-5 * float(torch.linalg.norm(r.float())) or diff <= 1e-7 * float(total), (what, name)


def _check(got: dict, ref: dict, what: str) -> None:
    assert _rel(got["logits"], ref["logits"]) <= 1e-5, what
    for g, r in zip(got["losses"], ref["losses"]):
        assert abs(g - r) <= 1e-5 * r, (what, got["losses"], ref["losses"])
    assert got["grads"].keys() == ref["grads"].keys(), what
    _close(got["grads"], ref["grads"], what)
    _close(got["weights"], ref["weights"], what)


def test_tensor_parallel_plans_match_transformers(folders):
    refs = {f: _reference(d) for f, d in folders.items()}
    results = run_distributed(_tensor_parallel, world_size=2, args=(folders, [("1d", 2)]))
    results += run_distributed(_tensor_parallel, world_size=4, args=(folders, [("1d", 4), ("2d", 4)]))
    checked = 0
    for per_rank in results:
        for (mode, tp, family), got in per_rank.items():
            _check(got, refs[family], f"{family} {mode} tp={tp}")
            checked += 1
    assert checked == 2 * 3 + 4 * 3 * 2


def test_the_plans_split_in_the_cubic_modes_too(folders):
    """2.5D (2 x 2 x 2) and 3D (2 x 2 x 2) on 8 ranks: the plans name what layers are, and each mode
    decides how it splits them (its RMSNorm and LayerNorm all-reduce over the split features)."""
    refs = {f: _reference(d) for f, d in folders.items()}
    results = run_distributed(_tensor_parallel, world_size=8, args=(folders, [("2.5d", 8, 2), ("3d", 8)]))
    for per_rank in results:
        assert len(per_rank) == 6
        for (mode, tp, family), got in per_rank.items():
            _check(got, refs[family], f"{family} {mode} tp={tp}")


def test_sequence_parallel_plans_match_transformers(folders):
    refs = {f: _reference(d) for f, d in folders.items()}
    for per_rank in run_distributed(_sequence_parallel, world_size=2, args=(folders,)):
        assert len(per_rank) == 6
        for (sp_mode, family), got in per_rank.items():
            _check(got, refs[family], f"{family} sp=2 {sp_mode}")


def test_pipelined_plans_match_transformers(folders):
    results = run_distributed(_pipelined, world_size=2, args=(folders,))
    for family, folder in folders.items():
        ref = _reference(folder, micro=2)
        first, last = results[0][family], results[1][family]
        assert first["stage"] != last["stage"], family               # each stage holds its part
        for got in (first, last):
            for g, r in zip(got["losses"], ref["losses"]):
                assert abs(g - r) <= 1e-5 * r, (family, got["losses"], ref["losses"])
        _close(first["weights"], ref["weights"], family)
        # each stage's gradients, which together are the model's
        assert (first["grads"].keys() | last["grads"].keys()) >= ref["grads"].keys(), family
        for got in (first, last):
            mine = {n: g for n, g in ref["grads"].items() if n in got["grads"]}
            _close(got["grads"], mine, family)


def test_a_model_with_weights_is_converted_as_it_is_spread(folders):
    """`apply_plan` on a transformers model that holds weights (not made on meta): each swapped
    layer takes the module's values (GPT-2's Conv1D transposed), and the plan's layer sequence gives
    the unmodified model's logits."""
    from transformers import AutoModelForCausalLM

    from core.hf import apply_plan, plan_for
    from core.tensor import OneD

    for family, folder in folders.items():
        ref = AutoModelForCausalLM.from_pretrained(folder).eval()
        spread = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
        plan = plan_for(type(spread).__name__)
        apply_plan(spread, plan, OneD.serial())
        ids = _batch(0)[:, :-1]
        positions = torch.arange(ids.shape[1])
        with torch.no_grad():
            x = plan.embed(spread, ids, positions)
            for layer in spread.get_submodule(plan.blocks):
                x = plan.block(spread, layer, x, positions)
            assert torch.allclose(plan.head(spread, x), ref(ids).logits, atol=1e-5, rtol=0), family


def test_spreading_in_place_refuses_what_it_cannot_split():
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.distributed.comm import AxisGroup
    from core.errors import LoomError
    from core.hf.inplace import spread_inplace
    from core.tensor import OneD

    two = OneD(AxisGroup("tp", 2, 0, (0, 1)))
    holder = torch.nn.Module()
    holder.mlp = torch.nn.Linear(4, 4)
    with pytest.raises(LoomError, match="parallel.tp=2: Module holds no transformers model Loom has a plan for"):
        spread_inplace(holder, two)
    holder.lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    with pytest.raises(LoomError, match="lm is a GPT2LMHeadModel: its Conv1D weights are kept transposed"):
        spread_inplace(holder, two)

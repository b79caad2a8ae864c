"""The GPT model: causality, tied weights, loss at initialisation, generation, GPT-2 shape."""

import math

import pytest
import torch

from apps.gpt.config import GPTModelConfig, GPTRecipe
from apps.gpt.model import GPT, next_token_loss
from apps.gpt.pretrain import resolve_vocab
from core.config import load_recipe


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTModelConfig(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=64, **kw))


def test_future_tokens_do_not_change_past_logits():
    model = tiny().eval()
    x = torch.randint(0, 64, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 64
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_head_is_tied_to_the_embedding_and_stored_once():
    model = tiny()
    assert model.lm_head.weight is model.wte.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    untied = tiny(tie_weights=False)
    assert untied.num_params() == model.num_params() + 64 * 32


def test_initial_loss_is_near_uniform():
    model = tiny()
    batch = torch.randint(0, 64, (8, 17))
    assert next_token_loss(model, batch).item() == pytest.approx(math.log(64), rel=0.05)


def test_generate_appends_tokens_and_greedy_is_deterministic():
    model = tiny().eval()
    prompt = torch.tensor([[1, 2, 3]])
    out = model.generate(prompt, 20, temperature=0.0)
    assert out.shape == (1, 23) and torch.equal(out[:, :3], prompt)
    assert torch.equal(out, model.generate(prompt, 20, temperature=0.0))
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(prompt, 5, temperature=1.0, top_k=5, generator=g)
    assert sampled.shape == (1, 8)


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="longer than model.seq_len=16"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_gpt2_124m_recipe_builds_the_gpt2_small_shape():
    cfg = load_recipe(GPTRecipe, "gpt/gpt2-124m")
    with torch.device("meta"):
        model = GPT(cfg.model)
    # GPT-2 small: 124 M parameters with the 50,257-token vocabulary (padded to 50,304 here)
    assert 124e6 <= model.num_params() <= 125e6


def test_vocab_is_rounded_up_to_a_multiple_of_64():
    assert resolve_vocab(GPTModelConfig(), 257).vocab_size == 320
    assert resolve_vocab(GPTModelConfig(vocab_size=300), 257).vocab_size == 300


def test_gpt2_xl_nvme_recipe_builds_the_gpt2_xl_shape_and_its_plugin():
    from core.booster import ZeroPlugin, make_plugin
    from core.distributed import Layout, ParallelMesh

    cfg = load_recipe(GPTRecipe, "gpt/gpt2-xl-nvme")
    with torch.device("meta"):
        model = GPT(cfg.model)
    assert 1.55e9 <= model.num_params() <= 1.57e9       # GPT-2 XL: 1.5 B
    plugin = make_plugin(cfg, ParallelMesh.build(Layout()))
    assert isinstance(plugin, ZeroPlugin) and plugin.offload == "nvme"

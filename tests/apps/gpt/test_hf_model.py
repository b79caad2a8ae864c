"""The GPT app on Hugging Face models (`model.hf=FOLDER`), end to end: the shipped Llama recipe differs
from gpt/tiny only in its model folder and output; a run exports to a folder transformers loads
(logits equal to Loom's) and generates from it; a run starts from a GPT-2 folder's weights; Llama
weights from a folder train under ZeRO-3 with host offload and activation checkpointing on 2
ranks, under tp=2, and with NVMe offload under an evicting budget, as one process trains them (weights after 3 steps, 1e-5); a stopped run
resumes exactly; bad folders and layouts are refused in one line; the planner profiles such a
model on the meta device."""

import pytest
import torch
from safetensors.torch import load_file

import apps.gpt.pretrain as pretrain
from apps.gpt.config import GPTRecipe
from core.config import load_recipe, resolve_recipe
from core.errors import LoomError
from tests.apps.gpt.test_pretrain import generate, ranks

QUICK = ["data.tokenizer=bytes", "model.seq_len=16", "train.micro_batch=4", "train.progress=false",
         "sample.tokens=0", "train.eval_every=0", "data.val_fraction=0", "train.log_every=1",
         "optim.lr=0.01", "train.warmup_steps=0"]


def _gpt2_folder(folder):
    """A tiny GPT-2 with random weights and biases, saved by transformers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=320, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=256, eos_token_id=256)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _llama_folder(folder):
    """A tiny Llama (grouped-query attention, no biases) with random weights, saved by transformers.
    No biases: the attention key bias's gradient is exactly zero in exact arithmetic, and Adam turns
    its rounding noise, which differs between layouts, into full-size steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=320, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _weights(out, step):
    return load_file(out / "checkpoints" / f"step_{step:07d}" / "model.safetensors")


def _close(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for k in b:
        assert torch.linalg.norm(a[k] - b[k]) <= tol * torch.linalg.norm(b[k]), k


def test_the_llama_recipe_differs_from_tiny_only_in_its_model_folder():
    tiny = load_recipe(GPTRecipe, resolve_recipe("gpt/tiny"))
    llama = load_recipe(GPTRecipe, resolve_recipe("gpt/llama-tiny-code"))
    assert llama.model.hf == "gpt/models/llama-tiny"
    llama.model.hf, llama.output.dir = tiny.model.hf, tiny.output.dir
    assert llama == tiny


def test_llama_run_exports_to_transformers_and_generates(tmp_path, text_folder):
    from transformers import AutoModelForCausalLM

    from apps.gpt.export import export_hf
    from apps.gpt.generate import load_model

    out = tmp_path / "run"
    ranks(1, tmp_path, "--recipe", "gpt/llama-tiny-code", f"data.path={text_folder}", "train.steps=3",
          f"output.dir={out}", *QUICK)
    export_hf(out, tmp_path / "hf")
    ours, _ = load_model(out / "checkpoints" / "step_0000003", torch.device("cpu"))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids), atol=1e-5, rtol=0)
    assert generate(tmp_path, tmp_path / "hf").startswith("line")      # a Hugging Face folder samples too


def test_weights_train_alike_under_zero3_offload_checkpointing_and_tensor_parallelism(tmp_path, text_folder):
    folder = _llama_folder(tmp_path / "llama")
    common = [f"model.hf={folder}", f"data.path={text_folder}", "train.steps=3", *QUICK]
    ranks(1, tmp_path, *common, f"output.dir={tmp_path / 'one'}")
    ranks(2, tmp_path, *common, "parallel.dp=2", "train.micro_batch=2", "parallel.zero=3", "parallel.offload=cpu",
          "model.gradient_checkpointing=true", f"output.dir={tmp_path / 'zero3'}")
    ranks(2, tmp_path, *common, "parallel.tp=2", f"output.dir={tmp_path / 'tp'}")
    # NVMe offload under a budget of 2/3 of the weights: chunks leave and come back every step
    ranks(1, tmp_path, *common, "parallel.offload=nvme", "memory.chunk_mb=0.02", "memory.device_gb=0.0001",
          f"output.dir={tmp_path / 'nvme'}")
    one = _weights(tmp_path / "one", 3)
    for layout in ("zero3", "tp", "nvme"):
        _close(_weights(tmp_path / layout, 3), one)


def test_a_run_starts_from_the_folders_weights(tmp_path, text_folder):
    """At learning rate 0 the checkpoint is the folder's weights, in Loom's layout: GPT-2's Conv1D
    weights transposed, the tied head stored once under one of its names."""
    folder = _gpt2_folder(tmp_path / "gpt2")
    ranks(1, tmp_path, f"model.hf={folder}", f"data.path={text_folder}", "train.steps=1", *QUICK, "optim.lr=0",
          f"output.dir={tmp_path / 'run'}")
    saved, start = _weights(tmp_path / "run", 1), load_file(folder / "model.safetensors")
    for name, value in start.items():
        conv = name.endswith("weight") and any(k in name for k in ("c_attn", "c_proj", "c_fc"))
        expected = value.t() if conv else value
        got = saved.get(name, saved.get("lm_head.weight") if name == "transformer.wte.weight" else None)
        assert got is not None and torch.equal(got, expected), name


def test_a_stopped_run_resumes_exactly(tmp_path, text_folder):
    folder = _gpt2_folder(tmp_path / "gpt2")
    # a constant learning rate: a cosine schedule's shape depends on train.steps
    common = [f"model.hf={folder}", f"data.path={text_folder}", "train.checkpoint_every=2",
              "train.lr_schedule=constant", *QUICK]
    ranks(1, tmp_path, *common, "train.steps=4", f"output.dir={tmp_path / 'straight'}")
    ranks(1, tmp_path, *common, "train.steps=2", f"output.dir={tmp_path / 'stopped'}")
    ranks(1, tmp_path, *common, "train.steps=4", "train.resume=latest", f"output.dir={tmp_path / 'stopped'}")
    a, b = _weights(tmp_path / "straight", 4), _weights(tmp_path / "stopped", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _folder_with(tmp_path, name, config):
    folder = tmp_path / name
    config.save_pretrained(folder)
    return folder


def test_bad_folders_are_refused_in_one_line(tmp_path, text_folder):
    from transformers import BertConfig, LlamaConfig

    llama = dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                 architectures=["LlamaForCausalLM"])
    cases = [
        (tmp_path / "nowhere", "model.hf=", "the folder does not exist"),
        (_folder_with(tmp_path, "small", LlamaConfig(vocab_size=100, max_position_embeddings=64, **llama)),
         "model.hf=", "config.json has vocab_size=100, fewer than the tokenizer's 257 tokens"),
        (_folder_with(tmp_path, "short", LlamaConfig(vocab_size=320, max_position_embeddings=8, **llama)),
         "model.seq_len=16", "is longer than LlamaForCausalLM's context (8 positions"),
        (_folder_with(tmp_path, "bert", BertConfig(vocab_size=320, architectures=["BertForMaskedLM"])),
         "no parallel plan for BertForMaskedLM", "Loom has plans for GPT2LMHeadModel, LlamaForCausalLM, "
                                                 "OPTForCausalLM"),
    ]
    for folder, starts, says in cases:
        with pytest.raises(LoomError) as e:
            pretrain.main([f"model.hf={folder}", f"data.path={text_folder}", "train.steps=1",
                           f"output.dir={tmp_path / 'out'}", *QUICK])
        assert str(e.value).startswith(starts) and says in str(e.value), str(e.value)


def test_splits_the_model_cannot_take_are_refused_before_anything_is_made():
    from transformers import LlamaConfig

    from core.distributed.comm import AxisGroup
    from core.hf import HFCausalLM
    from core.sequence import SequenceParallel
    from core.tensor import OneD

    config = LlamaConfig(num_hidden_layers=1, hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                         intermediate_size=64, vocab_size=320, attention_dropout=0.1,
                         architectures=["LlamaForCausalLM"])
    two = OneD(AxisGroup("tp", 2, 0, (0, 1)))
    with pytest.raises(LoomError, match="num_key_value_heads=3 does not split into the 2 parts of "
                                        "parallel.tp_mode=1d"):
        HFCausalLM(config, two)
    ring = SequenceParallel(AxisGroup("sp", 2, 0, (0, 1)))
    with pytest.raises(LoomError, match="attention_dropout=0.1: under sequence parallelism the model's own dropout"):
        HFCausalLM(config, seq=ring)


def test_the_planner_profiles_a_hugging_face_model_on_the_meta_device():
    from apps.gpt.hf import resolve_folder
    from apps.gpt.planning import axes, profile
    from core.hf import HFCausalLM, load_config

    cfg = load_recipe(GPTRecipe, resolve_recipe("gpt/llama-tiny-code"))
    got = profile(cfg)
    assert [layer.name for layer in got.layers] == ["embed", "block0", "block1", "block2", "block3", "head"]
    assert got.params == HFCausalLM(load_config(resolve_folder(cfg.model.hf))).num_params()
    assert (got.hidden, got.heads, got.vocab) == (128, 4, 4096)
    assert axes(cfg) == ("dp", "pp", "tp", "sp")

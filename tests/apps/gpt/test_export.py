"""apps.gpt.export: a GPT checkpoint as a folder that transformers loads (GPT2LMHeadModel and
AutoTokenizer), and GPT-2 weights read back into Loom's GPT."""

import json
import os
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import pre_tokenizers

import apps.gpt.export as export
import apps.gpt.pretrain as pretrain
from apps.gpt.config import GPTModelConfig, GPTRecipe
from apps.gpt.generate import find_checkpoint, load_model
from apps.gpt.model import GPT
from apps.gpt.tokenizer import ByteTokenizer, load_tokenizer
from core.config import load_recipe
from core.errors import LoomError
from tests.apps.gpt.conftest import write_text_folder
from tests.commands import run_at_once

TEXT = "def f(x):\n    return 'héllo wörld' ∑ 😀  x . y 's\n\tdone  "
TINY = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.seq_len=16", "train.steps=2",
        "train.micro_batch=4", "train.progress=false", "sample.tokens=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short pretraining runs: bytes with tied weights, BPE with an untied head and dropout."""
    root = tmp_path_factory.mktemp("export")
    corpus = write_text_folder(root / "corpus")
    found = {}
    for kind, extra in (("bytes", []), ("bpe", ["data.bpe_vocab=300", "model.tie_weights=false",
                                                 "model.dropout=0.1"])):
        overrides = [f"data.path={corpus}", f"data.tokenizer={kind}", f"data.cache_dir={root / 'cache'}",
                     f"output.dir={root / kind}", *TINY, *extra]
        pretrain.train(load_recipe(GPTRecipe, "gpt/tiny", overrides))
        found[kind] = root / kind
    return found


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: export.export_hf(run, root / kind) for kind, run in runs.items()}


def loom(run):
    folder = find_checkpoint(str(run))
    model, recipe = load_model(folder, torch.device("cpu"))
    return model, recipe, load_tokenizer(folder)


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_gpt2_gives_loom_logits(runs, exported, kind):
    from transformers import GPT2LMHeadModel

    out = exported[kind]["out"]
    model, recipe, _ = loom(runs[kind])
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, recipe.model.vocab_size, (3, recipe.model.seq_len), generator=gen)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-5
    assert exported[kind]["max_abs_diff"] <= 1e-5 and exported[kind]["params"] == model.num_params()
    config = json.loads((out / "config.json").read_text())
    assert config["n_positions"] == 16 and config["vocab_size"] == recipe.model.vocab_size
    assert config["resid_pdrop"] == config["attn_pdrop"] == config["embd_pdrop"] == recipe.model.dropout
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    tied = recipe.model.tie_weights
    assert tied == (kind == "bytes") and config["tie_word_embeddings"] == tied
    # tied: the head is left out of the file (as save_pretrained does) and shares the embedding once loaded
    assert ("lm_head.weight" in stored) == (not tied)
    assert (hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()) == tied
    assert torch.equal(hf.lm_head.weight, model.lm_head.weight)
    assert sorted(p.name for p in out.iterdir()) == exported[kind]["files"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no temporary folder left


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_auto_tokenizer_encodes_like_loom(runs, exported, kind):
    from transformers import AutoTokenizer

    out = exported[kind]["out"]
    _, recipe, mine = loom(runs[kind])
    theirs = AutoTokenizer.from_pretrained(out)
    ids = mine.encode(TEXT)
    assert theirs.encode(TEXT) == ids and theirs(TEXT)["input_ids"] == ids
    assert theirs.decode(ids) == mine.decode(ids) == TEXT
    assert theirs.eos_token_id == theirs.bos_token_id == mine.eot_id
    assert theirs.model_max_length == recipe.model.seq_len
    # the HF files, not Loom's own tokenizer_config.json ({"kind": ...})
    assert "kind" not in json.loads((out / "tokenizer_config.json").read_text())


def test_byte_tokenizer_is_byte_tokenizer():
    assert sorted(export.byte_symbols()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    tok, mine = export.byte_tokenizer_json(), ByteTokenizer()
    text = TEXT + "".join(chr(c) for c in range(128)) + "ÿ€\u2028"
    assert tok.encode(text).ids == mine.encode(text)
    assert tok.token_to_id("<|endoftext|>") == mine.eot_id == 256
    for ids in (list(range(256)), [0xFF, 0x41, 0xC3], mine.encode(text)):   # invalid UTF-8 too
        assert tok.decode(ids) == mine.decode(ids)


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_round_trip_through_gpt_state_from_hf(runs, exported, kind):
    model, recipe, _ = loom(runs[kind])
    keys, state = export.gpt_state_from_hf(exported[kind]["out"])
    cfg = GPTModelConfig(**{k.removeprefix("model."): v for k, v in keys.items()})
    assert cfg == recipe.model
    torch.manual_seed(0)
    again = GPT(cfg)
    again.load_state_dict(state)          # strict: every name, nothing more
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(again.eval()(ids), model(ids))


def test_import_reads_older_and_sharded_gpt2_files(exported, tmp_path):
    # files of GPT2Model-era checkpoints: no `transformer.` prefix, the causal-mask buffers stored,
    # the weights split over two files with an index
    src = exported["bpe"]["out"]
    _, want = export.gpt_state_from_hf(src)
    shutil.copy(src / "config.json", tmp_path / "config.json")
    weights = {k.removeprefix("transformer."): v for k, v in load_file(src / "model.safetensors").items()}
    weights["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
    weights["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    names = sorted(weights)
    weight_map = {}
    for i, part in enumerate((names[:10], names[10:])):
        save_file({k: weights[k] for k in part}, tmp_path / f"model-{i + 1:05d}-of-00002.safetensors")
        weight_map.update({k: f"model-{i + 1:05d}-of-00002.safetensors" for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, got = export.gpt_state_from_hf(tmp_path)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("key, value", [("activation_function", "relu"), ("scale_attn_by_inverse_layer_idx", True),
                                        ("reorder_and_upcast_attn", True), ("add_cross_attention", True),
                                        ("n_inner", 96), ("layer_norm_epsilon", 1e-6), ("attn_pdrop", 0.2)])
def test_import_refuses_what_loom_cannot_express(exported, tmp_path, key, value):
    src = exported["bytes"]["out"]
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    os.symlink(src / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(LoomError, match=f"{key}="):
        export.gpt_state_from_hf(tmp_path)


def test_refusals_leave_everything_as_it_was(runs, exported, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(LoomError, match="exists and is not empty; choose a new folder, or replace it with --force"):
        export.export_hf(runs["bytes"], out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    with pytest.raises(LoomError, match="holds the checkpoint being exported"):
        export.export_hf(runs["bytes"], runs["bytes"], force=True)
    with pytest.raises(LoomError, match="model.bias=false: GPT-2 .* always has biases"):
        export.check_exportable(GPTModelConfig(bias=False))
    # not a checkpoint; a checkpoint of another model
    with pytest.raises(LoomError, match=f"CHECKPOINT {tmp_path}: not a Loom checkpoint folder nor a run folder"):
        export.export_hf(tmp_path, tmp_path / "x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text("{}")
    (other / "config.yaml").write_text("model:\n  unet: stable-diffusion\n")
    with pytest.raises(LoomError, match="does not hold a checkpoint of Loom's GPT"):
        export.export_hf(other, tmp_path / "x")
    # a failed check publishes nothing; --force replaces a folder once the new one is complete
    monkeypatch.setattr(export, "TOLERANCE", -1.0)
    with pytest.raises(LoomError, match="logits differ from Loom's"):
        export.export_hf(runs["bytes"], out, force=True)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and not (tmp_path / "x").exists()
    monkeypatch.undo()
    export.export_hf(runs["bytes"], out, force=True)
    assert sorted(p.name for p in out.iterdir()) == exported["bytes"]["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]


def test_command_line(runs, tmp_path):
    cmd = [sys.executable, "-m", "apps.gpt.export"]
    ok, missing, no_to = run_at_once([cmd + [str(runs["bpe"]), "--to", "hf", str(tmp_path / "hf")],
                                      cmd + [str(tmp_path / "nothing"), "--to", "hf", str(tmp_path / "x")],
                                      cmd + [str(runs["bpe"]), str(tmp_path / "x")]],
                                     env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {tmp_path / 'hf'} (config.json, ")
    assert "M parameters" in lines[0] and "max abs diff" in lines[0]
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: CHECKPOINT {tmp_path / 'nothing'}: not a Loom checkpoint folder nor a run folder "
        f"(expected meta.json or a checkpoints/ folder)"]
    assert no_to.returncode == 2 and "the following arguments are required: --to" in no_to.stderr
    assert not (tmp_path / "x").exists()
    shutil.rmtree(tmp_path / "hf")

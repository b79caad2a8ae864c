"""apps.gpt.generate on many prompts: the command line, weights streamed from NVMe under a budget
(a Loom checkpoint and a Hugging Face OPT folder), tensor parallelism over ranks, and refusals."""

import contextlib
import io

import pytest
import torch

import apps.gpt.export as export
import apps.gpt.generate as generate
import apps.gpt.pretrain as pretrain
from apps.gpt.config import GPTRecipe
from apps.gpt.tokenizer import load_tokenizer
from core.config import load_recipe
from core.distributed.testing import run_distributed
from core.errors import LoomError
from tests.apps.gpt.conftest import write_text_folder

TINY = ["model.n_layer=3", "model.d_model=64", "model.n_head=4", "model.seq_len=64", "train.steps=30",
        "train.micro_batch=4", "train.progress=false", "sample.tokens=0", "optim.lr=0.01",
        "train.eval_every=0"]
PROMPTS = "def main(\nimport os\n\nclass Foo:\n    return x\nfor i in range(\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    corpus = write_text_folder(root / "corpus")
    pretrain.train(load_recipe(GPTRecipe, "gpt/tiny", [f"data.path={corpus}", "data.tokenizer=bytes",
                                                       f"data.cache_dir={root / 'cache'}",
                                                       f"output.dir={root / 'run'}", *TINY]))
    (root / "prompts.txt").write_text(PROMPTS)
    return root


def main(*argv) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert generate.main([str(a) for a in argv]) == 0
    return out.getvalue(), err.getvalue()


def samples(text: str) -> list[str]:
    return [s.strip("\n") for s in text.split("--- sample ")[1:]]


def one_at_a_time(folder, prompts, new):
    model, _ = generate.load_model(generate.find_checkpoint(str(folder)), torch.device("cpu"))
    tok = load_tokenizer(generate.find_checkpoint(str(folder)))
    return [tok.decode(model.generate(torch.tensor([tok.encode(p)]), new, temperature=0)[0].tolist())
            for p in prompts]


def test_prompt_file_streamed_from_nvme_equals_the_model_in_memory(run, tmp_path):
    prompts = [p for p in PROMPTS.splitlines() if p.strip()]
    common = ["--checkpoint", run / "run", "--prompt-file", run / "prompts.txt", "--max-new-tokens", 12,
              "--temperature", 0, "--batch-size", 2]
    memory, said = main(*common)
    assert "weights on the device" in said and "tokens/s" in said
    expected = one_at_a_time(run / "run", prompts, 12)
    assert [s.split("\n", 1)[1] for s in samples(memory)] == expected
    streamed, said = main(*common, "memory.device_gb=0.0006", "parallel.offload=nvme", f"memory.nvme_dir={tmp_path}",
                          "memory.chunk_mb=0.05", "generate.micro_batches=2", "--explain")
    assert samples(streamed) == samples(memory)
    assert "streamed from nvme" in said and "micro_batches=2" in said and "GiB of weights read" in said
    assert "chosen:" in said                                          # --explain
    assert list(tmp_path.iterdir()) == []                             # the scratch file is gone


def test_hugging_face_opt_folder_streamed(tmp_path):
    from transformers import OPTConfig

    from core.hf import HFCausalLM

    config = OPTConfig(vocab_size=260, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                       max_position_embeddings=128, word_embed_proj_dim=64, bos_token_id=256, eos_token_id=256,
                       pad_token_id=256)
    config.save_pretrained(tmp_path / "cfg")
    torch.manual_seed(0)
    model = HFCausalLM.from_folder(tmp_path / "cfg")
    model.save_hf(tmp_path / "opt")
    export.byte_tokenizer_json().save(str(tmp_path / "opt" / "tokenizer.json"))      # bytes, 256 = end of text
    (tmp_path / "opt" / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\nab\nthe quick brown fox\n")
    common = ["--checkpoint", tmp_path / "opt", "--prompt-file", prompts, "--max-new-tokens", 6, "--temperature", 0]
    memory, _ = main(*common)
    streamed, said = main(*common, "memory.device_gb=0.0004", "parallel.offload=nvme", f"memory.nvme_dir={tmp_path}/n",
                          "memory.chunk_mb=0.02")
    assert samples(streamed) == samples(memory) and len(samples(memory)) == 3
    assert "streamed from nvme" in said


def _tp_rank(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert generate.main(argv) == 0
    return out.getvalue(), err.getvalue()


@pytest.mark.parametrize("stream", [False, True])
def test_tensor_parallel_ranks_generate_what_one_process_does(run, tmp_path, stream):
    argv = ["--checkpoint", str(run / "run"), "--prompt-file", str(run / "prompts.txt"), "--max-new-tokens", "10",
            "--temperature", "0"]
    one, _ = main(*argv)
    extra = ["memory.device_gb=0.0003", "parallel.offload=nvme", f"memory.nvme_dir={tmp_path}",
             "memory.chunk_mb=0.02"] if stream else []
    (out0, err0), (out1, _) = run_distributed(_tp_rank, world_size=2, args=(argv + extra,), timeout=300)
    assert out0 == one and out1 == ""
    assert "each of 2 ranks holds 1/2" in err0
    assert ("streamed from nvme" in err0) == stream


def test_bad_settings_and_budgets_are_refused_in_one_line(run, tmp_path):
    base = ["--checkpoint", str(run / "run"), "--max-new-tokens", "4"]
    with pytest.raises(LoomError, match="generate takes key=value settings among"):
        generate.main(base + ["memory.devcie_gb=1"])
    with pytest.raises(LoomError, match=r"smallest budget that runs is memory\.device_gb="):
        generate.main(base + ["memory.device_gb=0.00001", "parallel.offload=nvme", f"memory.nvme_dir={tmp_path}"])
    with pytest.raises(LoomError, match="exceed the model's context of 64"):
        generate.main(base[:2] + ["--max-new-tokens", "80"])
    with pytest.raises(LoomError, match="--prompt-file .* no prompts"):
        (tmp_path / "empty.txt").write_text("\n\n")
        generate.main(base + ["--prompt-file", str(tmp_path / "empty.txt")])
    with pytest.raises(LoomError, match="parallel.offload: got 'disk'"):
        generate.main(base + ["parallel.offload=disk"])
    with pytest.raises(LoomError, match="generate.decode_threads must not be negative"):
        generate.main(base + ["generate.decode_threads=-1"])
    assert generate.parse_settings(["generate.decode_threads=3", "memory.io_threads=2"]).decode_threads == 3


def test_a_model_hf_checkpoint_streams_like_it_loads(tmp_path):
    """A run of a Hugging Face Llama (`model.hf`): its checkpoint generates the same from memory
    and streamed, and what the model loaded whole generates one prompt at a time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=64, vocab_size=320,
                                 max_position_embeddings=64)).save_pretrained(tmp_path / "llama")
    corpus = write_text_folder(tmp_path / "corpus")
    pretrain.train(load_recipe(GPTRecipe, "gpt/tiny", [f"model.hf={tmp_path / 'llama'}", f"data.path={corpus}",
                                                       "data.tokenizer=bytes", f"data.cache_dir={tmp_path / 'c'}",
                                                       f"output.dir={tmp_path / 'run'}", "model.seq_len=32",
                                                       "train.steps=2", "train.micro_batch=4", "train.progress=false",
                                                       "sample.tokens=0"]))
    (tmp_path / "p.txt").write_text(PROMPTS)
    common = ["--checkpoint", tmp_path / "run", "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", 8,
              "--temperature", 0, "--batch-size", 3]
    memory, _ = main(*common)
    streamed, said = main(*common, "memory.device_gb=0.0002", "parallel.offload=nvme", f"memory.nvme_dir={tmp_path}/n",
                          "memory.chunk_mb=0.01")
    assert "streamed from nvme" in said
    assert samples(streamed) == samples(memory)
    prompts = [p for p in PROMPTS.splitlines() if p.strip()]
    assert [s.split("\n", 1)[1] for s in samples(memory)] == one_at_a_time(tmp_path / "run", prompts, 8)

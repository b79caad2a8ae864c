"""The GPT app's recipe: the shared sections plus `model`, `data` and `sample`."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import ConfigError, Recipe, opt, section


@dataclass
class GPTModelConfig:
    hf: str = opt("", "a Hugging Face causal LM to train instead of Loom's GPT: a local folder with config.json "
                      "(GPT-2, Llama or OPT; its weights too, else random ones), or one shipped beside the recipes "
                      "(gpt/models/llama-tiny); the config then sets the architecture and the keys below up to "
                      "seq_len are not read")
    n_layer: int = opt(4, "transformer blocks", min=1)
    n_head: int = opt(4, "attention heads per block (must divide d_model)", min=1)
    d_model: int = opt(128, "width of the residual stream", min=8)
    seq_len: int = opt(128, "context length in tokens", min=2)
    vocab_size: int = opt(0, "embedding rows; 0 = the tokenizer's vocabulary rounded up to a multiple of 64", min=0)
    dropout: float = opt(0.0, "dropout on attention weights, residual branches and embeddings", min=0.0, max=0.9)
    bias: bool = opt(True, "biases in linear layers and LayerNorms")
    tie_weights: bool = opt(True, "share the token embedding with the output head")
    init_std: float = opt(0.02, "standard deviation of the initial weights", min=0.0)
    gradient_checkpointing: bool = opt(False, "recompute each block's activations in backward instead of keeping "
                                              "them: memory for activations falls to one block's, for one more "
                                              "forward of compute")


@dataclass
class GPTDataConfig:
    path: str = opt("stdlib", "a folder of text files, or 'stdlib' for the Python standard library's own source (no download)")
    glob: str = opt("**/*.txt", "which files of data.path to read (ignored for stdlib)")
    tokenizer: str = opt("bpe", "byte-level BPE trained on the corpus, or raw bytes", choices=("bpe", "bytes"))
    bpe_vocab: int = opt(4096, "vocabulary size of the BPE tokenizer", min=260, max=65535)
    max_bytes: int = opt(0, "read at most this many bytes of text; 0 = all", min=0)
    val_fraction: float = opt(0.02, "fraction of the tokens (from the end) held out for validation", min=0.0, max=0.5)
    cache_dir: str = opt("", "where tokenized corpora are cached; '' = $LOOM_CACHE or ~/.cache/loom")


@dataclass
class GPTSampleConfig:
    prompt: str = opt("def ", "text the finished model continues, printed at the end of a run")
    tokens: int = opt(64, "tokens to sample at the end of a run; 0 = none", min=0)
    temperature: float = opt(0.8, "sampling temperature", min=0.0)
    top_k: int = opt(40, "sample among the k most likely tokens; 0 = all", min=0)


@dataclass
class GPTRecipe(Recipe):
    model: GPTModelConfig = section(GPTModelConfig, "the GPT architecture")
    data: GPTDataConfig = section(GPTDataConfig, "the text corpus and its tokenizer")
    sample: GPTSampleConfig = section(GPTSampleConfig, "a text sample from the finished model")

    def check(self) -> None:
        super().check()
        m = self.model
        if m.d_model % m.n_head:
            raise ConfigError(f"model.n_head: got {m.n_head}; allowed: a divisor of model.d_model "
                              f"({m.d_model}), e.g. {', '.join(str(h) for h in range(1, 17) if m.d_model % h == 0)}")
        if m.vocab_size and self.data.tokenizer == "bytes" and m.vocab_size < 257:
            raise ConfigError(f"model.vocab_size: got {m.vocab_size}; allowed: 0 or at least 257 "
                              f"for data.tokenizer=bytes (256 bytes + end of text)")
        if m.vocab_size and self.data.tokenizer == "bpe" and m.vocab_size < self.data.bpe_vocab:
            raise ConfigError(f"model.vocab_size: got {m.vocab_size}; allowed: 0 or at least "
                              f"data.bpe_vocab ({self.data.bpe_vocab})")

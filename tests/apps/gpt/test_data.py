"""The GPT corpus: tokenized once, cached, split, and read back in windows."""

import numpy as np
import pytest
import torch

from apps.gpt.config import GPTDataConfig
from apps.gpt.data import TokenWindows, corpus_files, prepare_corpus
from core.distributed import Layout, ParallelMesh
from core.errors import LoomError

WORLD = ParallelMesh.build(Layout()).world


def test_folder_corpus_with_bytes_round_trips(text_folder, tmp_path):
    cfg = GPTDataConfig(path=str(text_folder), tokenizer="bytes", cache_dir=str(tmp_path / "cache"),
                        val_fraction=0.1)
    corpus = prepare_corpus(cfg, WORLD, log=lambda m: None)
    text = (text_folder / "a.txt").read_text() + (text_folder / "sub" / "b.txt").read_text()
    assert len(corpus.tokens) == len(text.encode()) + 2        # one end-of-text per file
    assert corpus.tokenizer.decode(corpus.tokens[:200].tolist()) == text[:200]
    assert corpus.n_train == round(len(corpus.tokens) * 0.9)
    assert corpus.tokens[len((text_folder / "a.txt").read_bytes())] == corpus.tokenizer.eot_id


def test_bpe_corpus_is_cached_and_reused(text_folder, tmp_path):
    cfg = GPTDataConfig(path=str(text_folder), tokenizer="bpe", bpe_vocab=300, cache_dir=str(tmp_path))
    messages = []
    first = prepare_corpus(cfg, WORLD, log=messages.append)
    second = prepare_corpus(cfg, WORLD, log=messages.append)
    assert len(messages) == 1 and "tokenizing" in messages[0]     # built once
    assert first.folder == second.folder and np.array_equal(first.tokens, second.tokens)
    assert first.tokenizer.vocab_size <= 300
    sample = "the quick brown fox"
    assert first.tokenizer.decode(first.tokenizer.encode(sample)) == sample
    # fewer tokens than bytes: the BPE learned merges
    assert len(first.tokens) < sum(p.stat().st_size for p in text_folder.rglob("*.txt"))
    (text_folder / "a.txt").write_text("changed\n")                 # a changed corpus is re-tokenized
    third = prepare_corpus(cfg, WORLD, log=messages.append)
    assert third.folder != first.folder and len(messages) == 2


def test_stdlib_corpus_leaves_out_tests():
    root, files = corpus_files(GPTDataConfig())
    assert len(files) > 500
    assert (root / "json" / "decoder.py") in files
    assert not any("test" in p.relative_to(root).parts[:-1] for p in files)


def test_windows_pair_inputs_with_next_tokens():
    tokens = np.arange(50, dtype=np.uint16)
    ds = TokenWindows(tokens, seq_len=8)
    assert len(ds) == 6
    assert torch.equal(ds[1], torch.arange(8, 17))
    with pytest.raises(LoomError, match="too few for one window of model.seq_len=64"):
        TokenWindows(tokens, seq_len=64, what="validation split")


def test_bad_corpus_paths(tmp_path):
    with pytest.raises(LoomError, match="data.path: .* is not a folder"):
        prepare_corpus(GPTDataConfig(path=str(tmp_path / "missing")), WORLD)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoomError, match=r"data.path: no files match data.glob='\*\*/\*.txt'"):
        prepare_corpus(GPTDataConfig(path=str(tmp_path / "empty")), WORLD)

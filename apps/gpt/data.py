"""The GPT corpus: text files tokenized once into a memory-mapped token file, cached.

The embedded default needs no download: the Python standard library's own source (its `.py`
files, test folders left out; about 12 MB of text on CPython 3.11). A folder of the user's text
files works the same way. The first run tokenizes (training a byte-level BPE when asked) and
writes `<cache>/gpt/<name>-<fingerprint>/` holding `tokens.bin`, the tokenizer and
`meta.json`; later runs with the same files and settings map that file and start at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from apps.gpt.config import GPTDataConfig
from apps.gpt.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer
from core.cache import cache_dir
from core.distributed.comm import AxisGroup
from core.distributed.once import on_main_first
from core.errors import LoomError

STDLIB = "stdlib"
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def corpus_files(cfg: GPTDataConfig) -> tuple[Path, list[Path]]:
    """The corpus folder and its files, in a fixed order."""
    if cfg.path == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in root.rglob("*.py")
                 if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    else:
        root = Path(cfg.path).expanduser()
        if not root.is_dir():
            raise LoomError(f"data.path: {cfg.path} is not a folder; give a folder of text files "
                            f"or 'stdlib' for the built-in corpus")
        files = [p for p in root.glob(cfg.glob) if p.is_file()]
        if not files:
            raise LoomError(f"data.path: no files match data.glob={cfg.glob!r} in {root}")
    return root, sorted(files)


def _fingerprint(root: Path, files: list[Path], cfg: GPTDataConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"tokenizer": cfg.tokenizer, "bpe_vocab": cfg.bpe_vocab,
                         "max_bytes": cfg.max_bytes, "format": 1}).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class Corpus:
    folder: Path
    tokens: np.ndarray          # memory-mapped, all documents separated by end-of-text
    n_train: int                # tokens[:n_train] train, tokens[n_train:] validation
    tokenizer: Tokenizer

    @property
    def train_tokens(self) -> np.ndarray:
        return self.tokens[:self.n_train]

    @property
    def val_tokens(self) -> np.ndarray:
        return self.tokens[self.n_train:]


def _read_texts(files: list[Path], max_bytes: int) -> list[str]:
    texts, total = [], 0
    for p in files:
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise LoomError(f"cannot read {p}: {e.strerror}") from None
        if max_bytes and total + len(raw) > max_bytes:
            raw = raw[:max_bytes - total]
        texts.append(raw.decode("utf-8", errors="replace"))
        total += len(raw)
        if max_bytes and total >= max_bytes:
            break
    return texts


def _build(folder: Path, root: Path, files: list[Path], cfg: GPTDataConfig,
           log: Callable[[str], None]) -> None:
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    texts = _read_texts(files, cfg.max_bytes)
    n_bytes = sum(len(t) for t in texts)
    log(f"tokenizing {n_bytes / 1e6:.1f} MB of text from {len(texts)} files under {root} "
        f"(once; cached in {folder})")
    if cfg.tokenizer == "bpe":
        tokenizer: Tokenizer = BPETokenizer.train(texts, cfg.bpe_vocab)
    else:
        tokenizer = ByteTokenizer()
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    n_tokens = 0
    chunk = 256
    with open(tmp / "tokens.bin", "wb") as f:
        for start in tqdm(range(0, len(texts), chunk), desc="tokenizing", unit="chunk",
                          disable=len(texts) <= chunk, file=sys.stderr):
            for ids in tokenizer.encode_batch(texts[start:start + chunk]):
                arr = np.asarray(ids + [tokenizer.eot_id], dtype=dtype)
                f.write(arr.tobytes())
                n_tokens += len(arr)
    tokenizer.save(tmp)
    meta = {"n_tokens": n_tokens, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer.kind, "files": len(texts), "bytes": n_bytes, "root": str(root)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def prepare_corpus(cfg: GPTDataConfig, world: AxisGroup, log: Callable[[str], None] = print) -> Corpus:
    """Tokenize the corpus once (rank 0, the others wait) and map it."""
    root, files = corpus_files(cfg)
    folder = cache_dir(cfg.cache_dir) / "gpt" / f"{'stdlib' if cfg.path == STDLIB else root.name}-{_fingerprint(root, files, cfg)}"

    def build() -> None:
        if not (folder / "meta.json").is_file():
            try:
                _build(folder, root, files, cfg, log)
            except OSError as e:
                raise LoomError(f"cannot write the token cache in {folder.parent}: {e.strerror}; "
                                f"set data.cache_dir to a writable folder") from None

    on_main_first(world, build, "tokenizing the corpus")
    meta = json.loads((folder / "meta.json").read_text())
    if meta["n_tokens"] < 2:
        raise LoomError(f"the corpus under {root} holds no text ({meta['n_tokens']} tokens)")
    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
    n_train = int(round(len(tokens) * (1.0 - cfg.val_fraction)))
    return Corpus(folder, tokens, n_train, load_tokenizer(folder))


class TokenWindows(Dataset):
    """Non-overlapping windows of `seq_len + 1` tokens (inputs and their next-token targets)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, what: str = "corpus") -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.n = max(0, (len(tokens) - 1) // seq_len)
        if self.n == 0:
            raise LoomError(f"the {what} has {len(tokens)} tokens, too few for one window of "
                            f"model.seq_len={seq_len}; use more text or a shorter seq_len")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        s = i * self.seq_len
        return torch.from_numpy(np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64))

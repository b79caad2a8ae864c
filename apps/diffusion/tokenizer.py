"""A CLIP tokenizer written from scratch, for the tiny default model (no hub download).

The vocabulary holds every byte-level character alone and as a word end (so any text can be
tokenized), plus whole-word tokens for the words of the default captions, built by merges in
the standard `vocab.json` / `merges.txt` format that `CLIPTokenizer.from_pretrained` reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from core.errors import LoomError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def clip_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """The vocabulary and merges of a CLIP tokenizer that knows `words` as single tokens."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for ch in _byte_alphabet():
        add(ch)
    for ch in _byte_alphabet():
        add(ch + "</w>")
    merges: list[str] = []
    for word in sorted({w.lower() for w in words}):
        if not word.isalpha() or len(word) < 2:
            continue
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for sym in symbols[1:]:
            merge = f"{current} {sym}"
            if merge not in merges:
                merges.append(merge)
            current = current + sym
            add(current)
    add(BOS)
    add(EOS)
    return vocab, merges


def write_clip_tokenizer(folder: Path, words: Iterable[str]) -> Path:
    """Write vocab.json and merges.txt for a CLIP tokenizer that knows `words` as single tokens."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def check_tokenizer(tok, folder: Path):
    """`tok`, unless it is the 2-token stand-in that a tokenizer without its files "loads" as."""
    if len(tok) < 300:
        raise LoomError(f"the tokenizer in {folder} has only {len(tok)} tokens; its tokenizer.json (or "
                        f"vocab.json / merges.txt) is missing or damaged")
    return tok

"""Tokenizers for the GPT app: a byte-level BPE trained on the corpus, or raw bytes.

Both reserve one id for the end-of-text marker that separates documents. A tokenizer saves
itself into a folder (`tokenizer_config.json`, plus `tokenizer.json` for BPE) so that a
checkpoint carries the tokenizer it was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Protocol

from core.errors import LoomError

EOT = "<|endoftext|>"
CONFIG = "tokenizer_config.json"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def save(self, folder: Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (0-255) and 256 as end of text."""

    kind = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, folder: Path) -> None:
        (Path(folder) / CONFIG).write_text(json.dumps({"kind": self.kind}) + "\n")


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) from the `tokenizers` library."""

    kind = "bpe"

    def __init__(self, tok, eot: str = EOT) -> None:
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        eot_id = tok.token_to_id(eot)
        if eot_id is None:
            raise LoomError(f"the BPE tokenizer has no {eot} token; it was not made by Loom")
        self.eot_id = eot_id

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        self._tok.save(str(folder / "tokenizer.json"))
        (folder / CONFIG).write_text(json.dumps({"kind": self.kind}) + "\n")


def load_tokenizer(folder: Path) -> Tokenizer:
    folder = Path(folder)
    config = folder / CONFIG
    if not config.is_file():
        raise LoomError(f"no tokenizer in {folder} ({CONFIG} is missing)")
    settings = json.loads(config.read_text())
    kind = settings.get("kind")
    if kind is None and (folder / "tokenizer.json").is_file():     # a Hugging Face model folder's tokenizer
        from tokenizers import Tokenizer as HFTokenizer

        eos = settings.get("eos_token") or EOT
        eos = eos.get("content", EOT) if isinstance(eos, dict) else eos
        return BPETokenizer(HFTokenizer.from_file(str(folder / "tokenizer.json")), eos)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_file(str(folder / "tokenizer.json")))
    raise LoomError(f"{config}: unknown tokenizer kind {kind!r}")

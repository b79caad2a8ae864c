"""A decoder-only GPT: pre-LayerNorm blocks, causal attention through
`scaled_dot_product_attention`, GELU MLPs, and the output head tied to the token embedding.

The model is written once on `core.tensor`'s layers; a tensor-parallel mode given at
construction decides how they are split (without one, each layer computes exactly what its
torch.nn counterpart does). In every mode a rank holds whole attention heads (n_head / tp of them
in 1D, n_head / q in 2D, 2.5D and 3D) and its logits are its part of the vocabulary, which
`loss` never gathers. In 2D, 2.5D and 3D the batch is split too: the (batch, time) ids are the
same on every rank of the group, and each rank computes on its part of the batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from apps.gpt.config import GPTModelConfig
from core.errors import LoomError
from core.memory.recompute import Recompute
from core.sampling import last_position_logits, sample_tokens
from core.sequence import SequenceParallel
from core.tensor import (COLUMN, ROW, Dropout, Embedding, LayerNorm, Linear, OneD, PositionEmbedding, TPLayer,
                         TPMode, load_serial_state_dict, serial_state_dict)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTModelConfig, mode: TPMode, seq: SequenceParallel | None = None) -> None:
        super().__init__()
        self.mode, self.seq = mode, seq
        self.n_head = cfg.n_head // mode.head_parts          # this rank's heads
        self.head_dim = cfg.d_model // cfg.n_head
        self.qkv = Linear(cfg.d_model, 3 * cfg.d_model, mode, bias=cfg.bias, role=COLUMN, groups=3)
        self.proj = Linear(cfg.d_model, cfg.d_model, mode, bias=cfg.bias, role=ROW)
        self.dropout = cfg.dropout
        self.resid_drop = Dropout(cfg.dropout, mode)
        self.layer_idx = 0                            # its block's number (the KV cache's slot)

    def forward(self, x: torch.Tensor, cache=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`cache` (`core.inference.KVCache`) and `mask`: generation's cached keys and values and
        which of them each query sees (left-padded prompts); without them, causal attention."""
        b, t, _ = x.shape
        local = self.n_head * self.head_dim
        q, k, v = self.qkv(x).split(local, dim=2)
        q, k, v = (z.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for z in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.seq is not None:                      # this rank's part of the sequence
            y = self.seq.attention(q, k, v, causal=True)
        else:
            with self.mode.split_rng() if dropout else contextlib.nullcontext():   # this rank's heads
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, local)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTModelConfig, mode: TPMode) -> None:
        super().__init__()
        self.fc = Linear(cfg.d_model, 4 * cfg.d_model, mode, bias=cfg.bias, role=COLUMN)
        self.proj = Linear(4 * cfg.d_model, cfg.d_model, mode, bias=cfg.bias, role=ROW)
        self.drop = Dropout(cfg.dropout, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTModelConfig, mode: TPMode, seq: SequenceParallel | None = None) -> None:
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model, mode, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, mode, seq)
        self.ln2 = LayerNorm(cfg.d_model, mode, bias=cfg.bias)
        self.mlp = MLP(cfg, mode)

    def forward(self, x: torch.Tensor, cache=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, mask)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTModelConfig, mode: TPMode | None = None, seq: SequenceParallel | None = None,
                 recompute: Recompute | None = None) -> None:
        super().__init__()
        # Each parameter's initial values come from a generator of its own, seeded by this number
        # and its name (`init_parameter`): the same values whether the model is built whole, on the
        # meta device and made chunk by chunk in any order, or one pipeline stage at a time, and
        # whatever the layers' constructors drew. The one draw from torch's RNG is explicit on the
        # CPU, so it happens under a meta default device too.
        self.init_seed = int(torch.randint(0, 2**31 - 1, (), device="cpu"))
        # how a block is checkpointed (model.gradient_checkpointing): the session's, which knows
        # where the weights live; torch's checkpoint when the model is used on its own
        self.recompute = recompute or Recompute()
        if cfg.vocab_size <= 0:
            raise ValueError("GPT needs a resolved vocab_size (see apps.gpt.pretrain.resolve_vocab)")
        mode = mode or OneD.serial()
        check_splits(cfg, mode)
        if seq is not None and seq.size > 1:
            seq.check(cfg.seq_len, cfg.n_head // mode.head_parts)
            if cfg.dropout > 0:
                raise LoomError(f"model.dropout={cfg.dropout:g} with parallel.sp={seq.size}: split attention has no "
                                f"attention-probability dropout; set model.dropout=0")
        else:
            seq = None
        self.cfg = cfg
        self.mode, self.seq = mode, seq
        self.wte = Embedding(cfg.vocab_size, cfg.d_model, mode)
        self.wpe = PositionEmbedding(cfg.seq_len, cfg.d_model, mode)
        self.drop = Dropout(cfg.dropout, mode)
        self.blocks = nn.ModuleList(Block(cfg, mode, seq) for _ in range(cfg.n_layer))
        for i, block in enumerate(self.blocks):
            block.attn.layer_idx = i
        self.ln_f = LayerNorm(cfg.d_model, mode, bias=cfg.bias)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, mode, bias=False, role=COLUMN)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        if any(p.is_meta for p in self.parameters()):
            return   # built on the meta device: `init_parameter` fills each one where it will live
        with torch.no_grad():
            for name, p in self.named_parameters():
                module = self.get_submodule(name.rpartition(".")[0])
                pname = name.rpartition(".")[2]
                if not isinstance(module, TPLayer) or module.mode.size == 1:
                    self.init_parameter(name, p)
                    continue
                # a tensor-parallel parameter: draw the serial tensor (the same random numbers as
                # one process draws), keep this rank's part
                full = torch.empty(module.serial_shapes[pname])
                self.init_parameter(name, full)
                p.copy_(module.shard(pname, full))

    @torch.no_grad()
    def init_parameter(self, name: str, out: torch.Tensor) -> None:
        """Initial value of parameter `name` (unsplit), written into `out` (GPT-2's scheme), drawn
        from a generator seeded by the model's `init_seed` and the name alone."""
        if out.ndim >= 2:
            # residual projections scaled by 1/sqrt(2 x layers)
            scale = 1 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("proj.weight") else 1.0
            g = torch.Generator().manual_seed(self.init_seed * 1_000_003 + zlib.crc32(name.encode()))
            out.copy_(torch.empty(out.shape).normal_(0.0, self.cfg.init_std * scale, generator=g))
        elif name.endswith("bias"):
            nn.init.zeros_(out)
        else:
            nn.init.ones_(out)        # LayerNorm scales

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.wpe.weight.numel()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self._embed(idx)
        for block in self.blocks:
            x = self._block(block, x)
        return self._head(x)

    def _block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.gradient_checkpointing and self.training:
            return self.recompute(block, x)
        return block(x)

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than model.seq_len={self.cfg.seq_len}")
        if self.seq is not None:                      # this rank's tokens, their global positions
            idx, pos = self.seq.local(idx), self.seq.positions(t, idx.device)
        else:
            pos = torch.arange(t, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))

    def pipeline_layers(self) -> list:
        """The model as a sequence of layers a pipeline can cut into stages (`core.pipeline`):
        the embeddings, each block, the final LayerNorm with the classifier."""
        from core.pipeline import PipelineLayer

        return ([PipelineLayer("embed", ("wte", "wpe", "drop"), self._embed, body=False)]
                + [PipelineLayer(f"block{i}", (f"blocks.{i}",), functools.partial(self._block, block))
                   for i, block in enumerate(self.blocks)]
                + [PipelineLayer("head", ("ln_f", "lm_head"), self._head, body=False)])

    def inference_layers(self) -> list:
        """The model as generation runs it a layer at a time (`core.inference`): the embeddings at
        each row's positions, each block with the KV cache, and the head on the last position."""
        from core.inference import InferenceLayer

        if self.seq is not None:
            raise LoomError("a sequence-parallel model does not generate; load its checkpoint without parallel.sp")
        return ([InferenceLayer("embed", ("wte", "wpe"), lambda ids, step: self.wte(ids) + self.wpe(step.positions))]
                + [InferenceLayer(f"block{i}", (f"blocks.{i}",),
                                  functools.partial(lambda block, x, step: block(x, step.cache, step.mask), block))
                   for i, block in enumerate(self.blocks)]
                + [InferenceLayer("head", ("ln_f", "lm_head"), lambda x, step: self._head(x[:, -1:]))])

    def inference_shape(self) -> dict:
        """What the placement of a generation needs to know (`core.inference.placement`)."""
        return {"layers": self.cfg.n_layer, "width": self.cfg.d_model, "kv_width": self.cfg.d_model,
                "vocab": self.cfg.vocab_size, "context": self.cfg.seq_len}

    def pipeline_sample(self) -> torch.Tensor:
        """An input for the first pipeline layer (to time each layer): one context of random tokens
        per batch part of the tensor-parallel mode."""
        return torch.randint(0, self.cfg.vocab_size, (self.mode.batch_parts, self.cfg.seq_len))

    def pipeline_tied(self) -> list[tuple[str, str]]:
        """Weights used by two layers, by their name in each: the token embedding and the classifier."""
        return [("wte.weight", "lm_head.weight")] if self.cfg.tie_weights else []

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, generator: torch.Generator | None = None, top_p: float = 1.0,
                 stop: int | None = None) -> torch.Tensor:
        """Continue `idx` (batch, time) by sampling (`core.sampling.sample_tokens`); temperature 0 is greedy."""
        return sample_tokens(self.last_logits, idx, self.cfg.seq_len, max_new_tokens, temperature, top_k, generator,
                             top_p, stop)

    def last_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """The whole (batch, vocab) logits of the last position on every rank. Modes that split
        the batch get it padded to a multiple of their batch parts."""
        if self.seq is not None:
            raise LoomError("a sequence-parallel model does not sample; load its checkpoint in one process "
                            "(python -m apps.gpt.generate --checkpoint ...)")
        return last_position_logits(self, self.mode, idx)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of (this rank's part of) the logits against the target tokens (the
        whole batch: each rank takes its part)."""
        if self.seq is None:
            return self.mode.cross_entropy(logits, target)
        return self.seq.mean_loss(self.mode.cross_entropy(logits, self.seq.local(target)))

    def serial_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsplit state dict (every tensor-parallel rank takes part; each gets it all)."""
        return serial_state_dict(self)

    def load_serial_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's parts of an unsplit state dict (from any layout)."""
        load_serial_state_dict(self, state)


def check_splits(cfg: GPTModelConfig, mode: TPMode) -> None:
    """Refuse, before any work, a model whose sizes the mode cannot split."""
    if mode.size == 1:
        return
    where = f"parallel.tp_mode={mode.name} ({mode.describe()})"
    for what, n, parts in (("model.n_head", cfg.n_head, mode.head_parts),
                           ("model.vocab_size", cfg.vocab_size, mode.divisor("vocab")),
                           ("model.d_model", cfg.d_model, mode.divisor("width"))):
        if n % parts:
            raise LoomError(f"{what}={n} does not split into the {parts} parts {where} needs; "
                            f"use a multiple of {parts}")


def next_token_loss(model: nn.Module, batch: torch.Tensor, gpt: GPT | None = None) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens up to t; `batch` is (B, T+1).
    `model` runs the forward (the GPT, or a plugin's wrapper of it); `gpt`, when given, computes
    the loss (vocabulary-parallel under tensor parallelism)."""
    logits = model(batch[:, :-1])
    if gpt is not None:
        return gpt.loss(logits, batch[:, 1:])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

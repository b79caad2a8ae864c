"""A decoder-only GPT: pre-LayerNorm blocks, causal attention through
`scaled_dot_product_attention`, GELU MLPs, and the output head tied to the token embedding.

The model is written once on `core.tensor`'s layers; a tensor-parallel mode given at
construction decides how they are split (without one, each layer computes exactly what its
torch.nn counterpart does). In the 1D mode each rank holds n_head / tp whole heads, a quarter of
the MLP's columns / rows and vocab / tp rows of the tied embedding and head; its logits are its
part of the vocabulary, and `loss` never gathers them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from apps.gpt.config import GPTModelConfig
from core.errors import LoomError
from core.tensor import (COLUMN, ROW, Embedding, Linear, OneD, TPMode, load_serial_state_dict,
                         serial_state_dict)
from core.tensor.functional import gather_from


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTModelConfig, mode: TPMode) -> None:
        super().__init__()
        self.n_head = cfg.n_head // mode.size          # this rank's heads
        self.head_dim = cfg.d_model // cfg.n_head
        self.qkv = Linear(cfg.d_model, 3 * cfg.d_model, mode, bias=cfg.bias, role=COLUMN, groups=3)
        self.proj = Linear(cfg.d_model, cfg.d_model, mode, bias=cfg.bias, role=ROW)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        local = self.n_head * self.head_dim
        q, k, v = self.qkv(x).split(local, dim=2)
        q, k, v = (z.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, local)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTModelConfig, mode: TPMode) -> None:
        super().__init__()
        self.fc = Linear(cfg.d_model, 4 * cfg.d_model, mode, bias=cfg.bias, role=COLUMN)
        self.proj = Linear(4 * cfg.d_model, cfg.d_model, mode, bias=cfg.bias, role=ROW)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTModelConfig, mode: TPMode) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, mode)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTModelConfig, mode: TPMode | None = None) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("GPT needs a resolved vocab_size (see apps.gpt.pretrain.resolve_vocab)")
        mode = mode or OneD.serial()
        for what, n in (("model.n_head", cfg.n_head), ("model.vocab_size", cfg.vocab_size)):
            if n % mode.size:
                raise LoomError(f"{what}={n} does not split over parallel.tp={mode.size}; use a tp that divides it")
        self.cfg = cfg
        self.mode = mode
        self.wte = Embedding(cfg.vocab_size, cfg.d_model, mode)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, mode) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, mode, bias=False, role=COLUMN)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        if any(p.is_meta for p in self.parameters()):
            return   # built on the meta device: `init_parameter` fills each one where it will live
        with torch.no_grad():
            for name, p in self.named_parameters():
                if not getattr(p, "tp_split", False):
                    self.init_parameter(name, p)
                    continue
                # a split parameter: draw the serial tensor (the same random numbers as one
                # process draws), keep this rank's part
                module = self.get_submodule(name.rpartition(".")[0])
                if isinstance(module, Embedding):
                    full = torch.empty(module.mode.size * p.shape[0], p.shape[1])
                    self.init_parameter(name, full)
                    p.copy_(module.mode.shard_embedding(full))
                elif name.endswith("weight"):
                    full = torch.empty(module.out_features, module.in_features)
                    self.init_parameter(name, full)
                    p.copy_(module.mode.shard_linear(full, None, module.role, module.groups)[0])
                else:
                    self.init_parameter(name, p)         # biases: zeros, no random numbers

    @torch.no_grad()
    def init_parameter(self, name: str, out: torch.Tensor) -> None:
        """Initial value of parameter `name`, written into `out` (GPT-2's scheme)."""
        if out.ndim >= 2:
            # residual projections scaled by 1/sqrt(2 x layers)
            scale = 1 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("proj.weight") else 1.0
            nn.init.normal_(out, mean=0.0, std=self.cfg.init_std * scale)
        elif name.endswith("bias"):
            nn.init.zeros_(out)
        else:
            nn.init.ones_(out)        # LayerNorm scales

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.wpe.weight.numel()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than model.seq_len={self.cfg.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue `idx` (batch, time) by sampling; temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            logits = gather_from(self(idx[:, -self.cfg.seq_len:])[:, -1, :].float(), self.mode.axis, -1)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of (this rank's part of) the logits against the target tokens."""
        return self.mode.cross_entropy(logits, target)

    def serial_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsplit state dict (every tensor-parallel rank takes part; each gets it all)."""
        return serial_state_dict(self)

    def load_serial_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's parts of an unsplit state dict (from any layout)."""
        load_serial_state_dict(self, state)


def next_token_loss(model: nn.Module, batch: torch.Tensor, gpt: GPT | None = None) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens up to t; `batch` is (B, T+1).
    `model` runs the forward (the GPT, or a plugin's wrapper of it); `gpt`, when given, computes
    the loss (vocabulary-parallel under tensor parallelism)."""
    logits = model(batch[:, :-1])
    if gpt is not None:
        return gpt.loss(logits, batch[:, 1:])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

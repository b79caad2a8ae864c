"""Batched generation a layer at a time: prompts of different lengths, a KV cache, micro-batches.

    engine = Engine(model, device)                         # weights in memory
    engine = Engine(model, device, stream=WeightStream(...))   # weights streamed (core.inference.stream)
    result = engine.generate(prompts, max_new_tokens=32, batch_size=8, micro_batches=4)

The prompts are cut into micro-batches of `batch_size` rows, each left-padded to the longest prompt
of its group, and `micro_batches` of them go through each layer one after the other while that
layer's weights are on the device: with streamed weights one read of the model then serves
`micro_batches x batch_size` rows (the throughput mode of FlexGen, Sheng et al. 2023, "FlexGen:
High-Throughput Generative Inference of Large Language Models with a Single GPU"). The first pass
of a group reads the prompts whole (prefill), a micro-batch at a time; every later pass reads one
new token per row against the cache, and runs the group's micro-batches through each layer as one
batch (their rows share one KV cache), so that each weight is read from memory once per pass
rather than once per micro-batch: a new-token step is bound by those reads. Sampling is greedy,
top-k or top-p (`core.sampling.choose_tokens`); a row ends at the stop token, and a group ends
when all its rows have.

Under 1D tensor parallelism every rank runs the same loop on its heads and its part of the
vocabulary; the last position's logits are gathered whole on every rank, so every rank samples
the same tokens (with the same generator seed).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from core.errors import LoomError
from core.inference.steps import KVCache, make_step
from core.inference.stream import WeightStream
from core.sampling import choose_tokens


def check_context(context: int, longest: int, new_tokens: int) -> None:
    """Refuse, before anything runs, a generation that would go past the model's positions."""
    if longest + new_tokens > context:
        raise LoomError(f"a prompt of {longest} tokens and {new_tokens} new ones exceed the model's context of "
                        f"{context} positions; shorten the prompt or --max-new-tokens")


@dataclass
class GenerationResult:
    tokens: list[list[int]]                       # each prompt's new tokens (up to, not with, the stop token)
    seconds: float = 0.0                          # the whole generation
    prefill_seconds: float = 0.0                  # the first pass of every group
    token_steps: int = 0                          # rows x passes computed (what tokens/s counts)
    passes: int = 0
    bytes_read: int = 0                           # weights moved to the device
    wait_seconds: float = 0.0                     # compute waiting for weights
    kv_bytes: int = 0                             # the KV caches of one group

    @property
    def tokens_per_second(self) -> float:
        return self.token_steps / self.seconds if self.seconds > 0 else 0.0


@contextlib.contextmanager
def _threads(count: int):
    """torch's intra-op threads set to `count` inside (0: unchanged)."""
    before = torch.get_num_threads()
    if count <= 0 or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Engine:
    """`model`: any model with `inference_layers()` (Loom's GPT, `core.hf.HFCausalLM`), its weights
    in memory or streamed by `stream`; `kv_device`: where the KV cache lives (default: `device`)."""

    def __init__(self, model: nn.Module, device: torch.device | str, stream: WeightStream | None = None,
                 kv_device: torch.device | str | None = None, layers=None, decode_threads: int = 0) -> None:
        """`decode_threads`: torch's intra-op threads during new-token passes (0: as they are)."""
        self.model = model.eval()                   # no dropout
        self.decode_threads = decode_threads
        self.device = torch.device(device)
        self.stream = stream
        self.kv_device = torch.device(kv_device) if kv_device is not None else self.device
        self.layers = layers if layers is not None else model.inference_layers()
        self.blocks = len(self.layers) - 2
        self.context = model.inference_shape()["context"]
        self.mode = getattr(model, "mode", None)
        if self.mode is not None and self.mode.size > 1 and self.mode.batch_parts > 1:
            raise LoomError(f"generation splits models by parallel.tp_mode=1d only (got {self.mode.name}); "
                            f"load the checkpoint with parallel.tp_mode=1d or on one process")

    @torch.no_grad()
    def _pass(self, inputs: list[torch.Tensor], steps) -> list[torch.Tensor]:
        """Every micro-batch through every layer, a layer at a time -> each one's last logits (b, vocab)."""
        if self.stream is not None:
            self.stream.start_pass()
        hs = inputs
        for i, layer in enumerate(self.layers):
            with self.stream.resident(i) if self.stream is not None else contextlib.nullcontext():
                hs = [layer.run(h, step) for h, step in zip(hs, steps)]
        out = []
        for h in hs:
            logits = h[:, -1:, :].float()
            if self.mode is not None and self.mode.size > 1:
                from core.tensor import COLUMN

                logits = self.mode.gather_activation(logits, COLUMN)
            out.append(logits[:, -1, :])
        return out

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 0, micro_batches: int = 1,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop: int | None = None,
                 generator: torch.Generator | None = None, pad: int = 0, progress=None) -> GenerationResult:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise LoomError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise LoomError("max_new_tokens must be at least 1")
        batch_size = batch_size or len(prompts)
        micro_batches = max(1, micro_batches)
        group_rows = batch_size * micro_batches
        result = GenerationResult(tokens=[[] for _ in prompts])
        read0 = self.stream.bytes_read if self.stream is not None else 0
        wait0 = self.stream.manager.stats.wait_seconds if self.stream is not None else 0.0
        start = time.perf_counter()
        for g0 in range(0, len(prompts), group_rows):
            rows = list(range(g0, min(g0 + group_rows, len(prompts))))
            longest = max(len(prompts[r]) for r in rows)
            check_context(self.context, longest, max_new_tokens)
            mbs = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
            ids, pads = [], []
            for mb in mbs:
                pad_n = [longest - len(prompts[r]) for r in mb]
                ids.append(torch.tensor([[pad] * n + prompts[r] for r, n in zip(mb, pad_n)], device=self.device))
                pads.append(torch.tensor(pad_n, device=self.device))
            # one cache for the group; each micro-batch fills its rows of it
            whole = KVCache(self.blocks, longest + max_new_tokens, self.kv_device, self.device, rows=len(rows))
            caches = [whole.part(i, i + len(mb)) for i, mb in zip(range(0, len(rows), batch_size), mbs)]
            # A new-token step's activations are one row each, so its micro-batches go through a
            # layer as one batch: each weight is then read from memory once for all of them, not
            # once per micro-batch (decoding is bound by those reads). Not where the cache lives on
            # the host for a GPU: a layer's keys and values then travel a micro-batch at a time.
            stack = len(mbs) > 1 and self.kv_device == self.device
            all_pads = torch.cat(pads) if stack else None
            done = [torch.zeros(len(mb), dtype=torch.bool, device=self.device) for mb in mbs]
            inputs, t = ids, longest
            for n in range(max_new_tokens):
                t0 = time.perf_counter()
                with _threads(self.decode_threads if t == 1 else 0):
                    if stack and t == 1:
                        logits = self._pass([torch.cat(inputs)], [make_step(all_pads, 1, whole)])
                        logits = list(logits[0].split([len(mb) for mb in mbs]))
                    else:
                        logits = self._pass(inputs, [make_step(p, t, c) for p, c in zip(pads, caches)])
                whole.advance(t)
                inputs = []
                for k, (mb, lg) in enumerate(zip(mbs, logits)):
                    nxt = choose_tokens(lg, temperature, top_k, top_p, generator)
                    if stop is not None:
                        nxt = nxt.masked_fill(done[k].unsqueeze(1), stop)
                    for row, tok, was_done in zip(mb, nxt[:, 0].tolist(), done[k].tolist()):
                        if not was_done and tok != stop:
                            result.tokens[row].append(tok)
                    if stop is not None:
                        done[k] |= nxt[:, 0] == stop
                    inputs.append(nxt)
                result.passes += 1
                result.token_steps += len(rows)
                if n == 0:
                    result.prefill_seconds += time.perf_counter() - t0
                if progress is not None:
                    progress(n + 1, max_new_tokens)
                t = 1
                if stop is not None and all(bool(d.all()) for d in done):
                    break
            result.kv_bytes = max(result.kv_bytes, whole.nbytes)
        if self.stream is not None:
            self.stream.settle()
        result.seconds = time.perf_counter() - start
        if self.stream is not None:
            result.bytes_read = self.stream.bytes_read - read0
            result.wait_seconds = self.stream.manager.stats.wait_seconds - wait0
        return result

    def close(self) -> None:
        """Remove a stream's scratch files (weights in memory need nothing)."""
        if self.stream is not None:
            self.stream.close()

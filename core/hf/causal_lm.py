"""A Hugging Face causal language model, spread by its family's plan, as a Loom model.

    model = HFCausalLM.from_folder("path/with/config.json", mode, seq)   # weights too, if the folder has them
    logits = model(ids)                  # this rank's part of the logits (vocabulary-split under tp)
    loss = model.loss(logits, targets)

The Hugging Face model is made on the meta device, its layers swapped for `core.tensor`'s by the
plan (`core.hf.plan`), and its top-level modules adopted under their own names, so the state dict
has exactly transformers' names (GPT-2's `transformer.h.0.attn.c_attn.weight`, ...), with weights
in Loom's layout. Each parameter is then made where it will live by `init_parameter`: read from the
folder's weights, converted and split, or drawn from a generator seeded by the model's seed and
the parameter's name, the same on any layout. Under the session's meta build (ZeRO-3, offload) the
engine calls `init_parameter` chunk by chunk; otherwise the model makes its own parameters here.

The model runs as the plan's sequence of layers (embeddings, decoder blocks, head), which is
also what a pipeline cuts (`pipeline_layers`) and what activation checkpointing recomputes per
block; sequence parallelism splits the tokens and passes global positions to each block.
"""

from __future__ import annotations

import copy
import functools
import math
import zlib
from pathlib import Path

import torch
from torch import nn

from core.checkpoint.sharding import SplitDraw, make_meta_parameters
from core.errors import LoomError
from core.hf import attention
from core.hf.families import plan_for
from core.hf.plan import ParallelPlan, apply_plan
from core.hf.weights import WeightSource, save_folder
from core.memory.recompute import Recompute
from core.sampling import last_position_logits, sample_tokens
from core.sequence import SequenceParallel
from core.tensor import OneD, TPMode, load_serial_state_dict, serial_state_dict
from core.tensor.layers import TPLayer

_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "opt": "OPTForCausalLM"}


def load_config(folder: str | Path):
    """The transformers config of a local model folder (never the hub), or one clear refusal."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise LoomError(f"model.hf={folder}: the folder {what}; give a local folder with a Hugging Face config.json "
                        f"(and optionally its weights), e.g. one written by save_pretrained")
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise LoomError(f"model.hf={folder}: config.json is not a config transformers understands ({e})") from None


def architecture(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return archs[0]
    return _ARCHITECTURES.get(config.model_type, f"{config.model_type} (no architectures in config.json)")


def context_length(config) -> int:
    """The longest sequence the model's positions cover."""
    for key in ("n_positions", "max_position_embeddings"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise LoomError(f"{architecture(config)}: its config names no maximum sequence length")


def check_split(config, plan: ParallelPlan, mode: TPMode, seq: SequenceParallel | None) -> None:
    """Refuse, in one line and before anything is made, what this layout cannot split."""
    plan.check(config, mode)
    heads = getattr(config, plan.heads_key)
    sizes = [(plan.heads_key, heads, mode.head_parts),
             ("vocab_size", config.vocab_size, mode.divisor("vocab")),
             ("hidden_size", config.hidden_size, mode.divisor("width"))]
    if plan.kv_heads_key and getattr(config, plan.kv_heads_key, None):
        sizes.append((plan.kv_heads_key, getattr(config, plan.kv_heads_key), mode.head_parts))
    for key, n, parts in sizes:
        if mode.size > 1 and n % parts:
            raise LoomError(f"{architecture(config)} config {key}={n} does not split into the {parts} parts of "
                            f"parallel.tp_mode={mode.name} ({mode.describe()}); choose a tensor-parallel layout "
                            f"whose parts divide it")
    split = mode.split_activations or (seq is not None and seq.size > 1)
    dropping = [f"{k}={getattr(config, k)}" for k in plan.dropout_keys if getattr(config, k, 0) or 0]
    if split and dropping:
        where = "sequence parallelism" if seq is not None and seq.size > 1 else f"parallel.tp_mode={mode.name}"
        raise LoomError(f"{architecture(config)} config {', '.join(dropping)}: under {where} the model's own dropout "
                        f"would draw the same numbers on every rank; set them to 0 in config.json")


class HFCausalLM(nn.Module):
    """A transformers causal LM made from `config`, spread over `mode`'s tensor-parallel ranks and
    `seq`'s sequence split by its family's plan; `source`: the weights it starts from (else drawn);
    `recompute`: the session's activation checkpointing, used per block when
    `gradient_checkpointing`."""

    def __init__(self, config, mode: TPMode | None = None, seq: SequenceParallel | None = None,
                 recompute: Recompute | None = None, source: WeightSource | None = None,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        mode = mode or OneD.serial()
        seq = seq if seq is not None and seq.size > 1 else None
        config = copy.deepcopy(config)
        plan = plan_for(architecture(config))
        check_split(config, plan, mode, seq)
        self.init_seed = int(torch.randint(0, 2**31 - 1, (), device="cpu"))
        self.plan, self.mode, self.seq, self.source = plan, mode, seq, source
        self.recompute = recompute or Recompute()
        self.gradient_checkpointing = gradient_checkpointing
        building_on_meta = torch.empty(0).is_meta           # the session's meta build (chunks made later)
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config, attn_implementation=attention.register())
            if type(hf).__name__ not in plan.classes:
                raise LoomError(f"config.json makes a {type(hf).__name__}; the {plan.family} plan is for "
                                f"{', '.join(plan.classes)}")
            apply_plan(hf, plan, mode, seq)
        self.config = hf.config
        for name, child in hf.named_children():
            self.add_module(name, child)
        self._make_buffers(hf)
        # what each module was in transformers (GPT-2's Conv1D stores its weight transposed), kept
        # by name: a pipeline stage converts the other stages' weights without holding their layers
        self._hf_types = {n: getattr(m, "hf_type", type(m).__name__) for n, m in self.named_modules()}
        params = dict(self.named_parameters(remove_duplicate=False))
        self.tied = (plan.tied is not None and plan.tied[0] in params
                     and params[plan.tied[0]] is params.get(plan.tied[1]))
        if not building_on_meta:             # made here, each parameter split as its layer splits it
            make_meta_parameters(self, SplitDraw(self, self.init_parameter))

    @classmethod
    def from_folder(cls, folder: str | Path, mode: TPMode | None = None, seq: SequenceParallel | None = None,
                    recompute: Recompute | None = None, gradient_checkpointing: bool = False) -> "HFCausalLM":
        """The model of a local folder: config.json, and its weights where the folder has them
        (else random weights)."""
        source = WeightSource(folder)
        return cls(load_config(folder), mode, seq, recompute, source or None, gradient_checkpointing)

    # ------------------------------------------------------------------------ making the weights

    def _make_buffers(self, hf: nn.Module) -> None:
        """Buffers computed at construction (Llama's rotary frequencies) were made on meta: they get
        their values on the host from transformers' own initialisation of their module."""
        for _, module in self.named_modules():
            meta = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
            if not meta:
                continue
            for n in meta:
                module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
            with torch.no_grad(), torch.device("cpu"):       # out of the session's meta build, if any
                hf._init_weights(module)

    def _role(self, name: str):
        module_name, _, pname = name.rpartition(".")
        return self.plan.role_of(module_name), pname, self._hf_types.get(module_name, "")

    @torch.no_grad()
    def init_parameter(self, name: str, out: torch.Tensor) -> None:
        """Initial value of parameter `name` (unsplit, Loom's layout), written into `out`: the folder's
        weights where there are some, else drawn (normal with the config's initializer range for
        matrices, ones for norm scales, zeros for biases) from a generator seeded by the model's
        seed and the name alone."""
        role, pname, module_type = self._role(name)
        if self.source is not None:
            key = name
            if name not in self.source and self.tied and name == self.plan.tied[1]:
                key = self.plan.tied[0]                 # a tied head stored once, as its embedding
            probe = torch.empty(out.shape, device="meta")
            if (role is None or role.to_loom(pname, probe, module_type) is probe) and self.source.read_into(key, out):
                return                                  # stored as Loom holds it: read in place
            value = self.source.get(key)
            if value is None:
                raise LoomError(f"{self.source.folder}: the weights have no tensor {name} (they hold "
                                f"{len(self.source.names)} others); the folder's config.json and weights disagree")
            if role is not None:
                value = role.to_loom(pname, value, module_type)
            if tuple(value.shape) != tuple(out.shape):
                raise LoomError(f"{self.source.folder}: {name} has shape {tuple(value.shape)}, the config makes "
                                f"{tuple(out.shape)}; the folder's config.json and weights disagree")
            out.copy_(value)
            return
        constant = role.init_value(pname) if role is not None else None
        if constant is None and out.ndim < 2:
            constant = 1.0 if pname == "weight" else 0.0
        if constant is not None:
            out.fill_(constant)
            return
        std = next((getattr(self.config, k) for k in self.plan.init_std_keys if getattr(self.config, k, None)), 0.02)
        g = torch.Generator().manual_seed(self.init_seed * 1_000_003 + zlib.crc32(name.encode()))
        out.copy_(torch.empty(out.shape).normal_(0.0, std, generator=g))

    def release_source(self) -> None:
        """Let go of the folder's weights once every parameter is made (their memory-mapped files
        would otherwise stay mapped, and count in the resident set, for as long as the model lives)."""
        self.source = None

    # ------------------------------------------------------------------------ running it

    def _positions(self, local_length: int, device) -> torch.Tensor:
        start = self.seq.rank * local_length if self.seq is not None else 0
        return torch.arange(start, start + local_length, device=device)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        limit = context_length(self.config)
        if ids.shape[1] > limit:
            raise LoomError(f"a sequence of {ids.shape[1]} tokens is longer than the model's context ({limit})")
        if self.seq is not None:
            ids = self.seq.local(ids)
        return self.plan.embed(self, ids, self._positions(ids.shape[1], ids.device))

    def _run_block(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.plan.block(self, layer, x, self._positions(x.shape[1], x.device))

    def _block(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return self.recompute(functools.partial(self._run_block, layer), x)
        return self._run_block(layer, x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.plan.head(self, x)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.get_submodule(self.plan.blocks)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, time), the same on every rank -> this rank's logits (its part of the
        vocabulary under tensor parallelism, of the tokens under sequence parallelism, of the batch
        in the 2D, 2.5D and 3D modes)."""
        x = self._embed(ids)
        for layer in self.blocks:
            x = self._block(layer, x)
        return self._head(x)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of (this rank's part of) the logits against the whole target."""
        if self.seq is None:
            return self.mode.cross_entropy(logits, target)
        return self.seq.mean_loss(self.mode.cross_entropy(logits, self.seq.local(target)))

    def num_params(self) -> int:
        """Parameters of the whole (unsplit) model, a tied weight once."""
        seen, n = set(), 0
        for module in self.modules():
            for pname, p in module.named_parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    n += math.prod(module.serial_shapes[pname]) if isinstance(module, TPLayer) else p.numel()
        return n

    def last_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """The whole (batch, vocab) logits of the last position on every rank."""
        if self.seq is not None:
            raise LoomError("a sequence-parallel model does not sample; load its checkpoint in one process")
        return last_position_logits(self, self.mode, idx)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 generator: torch.Generator | None = None, top_p: float = 1.0, stop: int | None = None) -> torch.Tensor:
        return sample_tokens(self.last_logits, idx, context_length(self.config), max_new_tokens, temperature,
                             top_k, generator, top_p, stop)

    # ------------------------------------------------------------------------ generation's view

    def inference_layers(self) -> list:
        """The model as generation runs it a layer at a time (`core.inference`): the embeddings at
        each row's positions, each decoder block with the KV cache and mask, the head on the last
        position."""
        from core.inference import InferenceLayer

        if self.seq is not None:
            raise LoomError("a sequence-parallel model does not generate; load its checkpoint without parallel.sp")
        def embed(ids, step):
            return self.plan.embed(self, ids, step.positions)

        def block(layer, x, step):
            return self.plan.block(self, layer, x, step.positions, cache=step.cache, mask=step.mask)

        return ([InferenceLayer("embed", self._present(self.plan.embed_modules), embed)]
                + [InferenceLayer(f"block{i}", (f"{self.plan.blocks}.{i}",), functools.partial(block, layer))
                   for i, layer in enumerate(self.blocks)]
                + [InferenceLayer("head", self._present(self.plan.head_modules),
                                  lambda x, step: self._head(x[:, -1:]))])

    def inference_shape(self) -> dict:
        """What the placement of a generation needs to know (`core.inference.placement`)."""
        c = self.config
        heads = getattr(c, self.plan.heads_key)
        kv = getattr(c, self.plan.kv_heads_key, None) if self.plan.kv_heads_key else None
        return {"layers": len(self.blocks), "width": c.hidden_size,
                "kv_width": c.hidden_size * (kv or heads) // heads, "vocab": c.vocab_size,
                "context": context_length(c)}

    # ------------------------------------------------------------------------ the pipeline's view

    def _present(self, names) -> tuple[str, ...]:
        return tuple(n for n in names if _has_module(self, n))

    def pipeline_layers(self) -> list:
        from core.pipeline import PipelineLayer

        return ([PipelineLayer("embed", self._present(self.plan.embed_modules), self._embed, body=False)]
                + [PipelineLayer(f"block{i}", (f"{self.plan.blocks}.{i}",), functools.partial(self._block, layer))
                   for i, layer in enumerate(self.blocks)]
                + [PipelineLayer("head", self._present(self.plan.head_modules), self._head, body=False)])

    def pipeline_sample(self) -> torch.Tensor:
        length = min(context_length(self.config), 64)
        return torch.randint(0, self.config.vocab_size, (self.mode.batch_parts, length))

    def pipeline_tied(self) -> list[tuple[str, str]]:
        return [self.plan.tied] if self.tied else []

    # ------------------------------------------------------------------------ weights in and out

    def serial_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsplit state dict in Loom's layout (every tensor-parallel rank takes part)."""
        return serial_state_dict(self)

    def load_serial_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_serial_state_dict(self, state)

    def hf_tensor(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """An unsplit parameter in transformers' layout (GPT-2's Conv1D weights transposed back)."""
        role, pname, module_type = self._role(name)
        return role.to_hf(pname, value, module_type) if role is not None else value

    def hf_config(self):
        """The model's config as transformers would save it (the standard attention again)."""
        config = copy.deepcopy(self.config)
        config._attn_implementation = None
        config.architectures = [self.plan.classes[0]]
        return config

    def hf_state(self, state: dict[str, torch.Tensor] | None = None):
        """(name, tensor) pairs of the unsplit weights in transformers' layout, and the names to
        leave out of a saved folder (a tied head, which transformers does not store)."""
        state = self.serial_state_dict() if state is None else state
        skip = [self.plan.tied[1]] if self.tied else []
        return ((n, self.hf_tensor(n, v)) for n, v in state.items()), skip

    def save_hf(self, out: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write a folder `from_pretrained` loads, atomically (every tensor-parallel rank gathers;
        call it on one process)."""
        pairs, skip = self.hf_state(state)
        return save_folder(out, self.hf_config(), pairs, skip)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        return model.get_submodule(name) is not None
    except AttributeError:
        return False


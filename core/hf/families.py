"""Plans for three families of Hugging Face causal language models: GPT-2, Llama and OPT.

Each is written against the model's module structure (names and types), checked with
transformers 5.24; the runners call the family's own decoder blocks, passing what each block
takes (positions, rotary embeddings) and no attention mask (the attention is causal by itself,
`core.hf.attention`), except in generation, which passes its KV cache and mask (`core.inference`).
"""

from __future__ import annotations

from core.errors import LoomError
from core.hf.plan import Column, Drop, Heads, Norm, ParallelPlan, PositionTable, Row, VocabEmbedding

CHECKED_WITH = "transformers 5.24"


def _refuse(family: str, what: str, fix: str) -> None:
    raise LoomError(f"{family} config: {what}; the {family} plan does not cover it ({fix})")


# ---------------------------------------------------------------------------------------------- GPT-2

def _gpt2_embed(m, ids, positions):
    t = m.transformer
    return t.drop(t.wte(ids) + t.wpe(positions))


def _rows(positions):
    """Positions as (batch, time): one row shared by the batch in training, one per row in generation."""
    return positions if positions.ndim == 2 else positions.unsqueeze(0)


def _gpt2_block(m, layer, x, positions, cache=None, mask=None):
    return layer(x, position_ids=_rows(positions), cache=cache, attention_mask=mask)


def _gpt2_head(m, x):
    return m.lm_head(m.transformer.ln_f(x))


def _gpt2_check(config, mode) -> None:
    if getattr(config, "add_cross_attention", False):
        _refuse("GPT-2", "add_cross_attention=true", "a decoder-only language model has no encoder to attend to")


GPT2 = ParallelPlan(
    family="GPT-2", classes=("GPT2LMHeadModel",), checked_with=CHECKED_WITH,
    layers={
        "transformer.wte": VocabEmbedding(),
        "transformer.wpe": PositionTable(),
        "transformer.drop": Drop(),
        "transformer.h.*.ln_1": Norm(),
        "transformer.h.*.ln_2": Norm(),
        "transformer.h.*.attn": Heads(counts=("num_heads",), widths=("split_size", "embed_dim")),
        "transformer.h.*.attn.c_attn": Column(groups=3),
        "transformer.h.*.attn.c_proj": Row(),
        "transformer.h.*.attn.resid_dropout": Drop(),
        "transformer.h.*.mlp.c_fc": Column(),
        "transformer.h.*.mlp.c_proj": Row(),
        "transformer.h.*.mlp.dropout": Drop(),
        "transformer.ln_f": Norm(),
        "lm_head": Column(),
    },
    blocks="transformer.h", embed_modules=("transformer.wte", "transformer.wpe", "transformer.drop"),
    head_modules=("transformer.ln_f", "lm_head"), embed=_gpt2_embed, block=_gpt2_block, head=_gpt2_head,
    tied=("transformer.wte.weight", "lm_head.weight"), check=_gpt2_check,
    dropout_keys=("resid_pdrop", "embd_pdrop", "attn_pdrop"), heads_key="n_head")


# ---------------------------------------------------------------------------------------------- Llama

def _llama_embed(m, ids, positions):
    return m.model.embed_tokens(ids)


def _llama_block(m, layer, x, positions, cache=None, mask=None):
    pos = _rows(positions)
    return layer(x, position_ids=pos, position_embeddings=m.model.rotary_emb(x, position_ids=pos), cache=cache,
                 attention_mask=mask)


def _llama_head(m, x):
    return m.lm_head(m.model.norm(x))


def _llama_check(config, mode) -> None:
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        _refuse("Llama", f"pretraining_tp={config.pretraining_tp}", "set it to 1: Loom splits the layers itself")


LLAMA = ParallelPlan(
    family="Llama", classes=("LlamaForCausalLM",), checked_with=CHECKED_WITH,
    layers={
        "model.embed_tokens": VocabEmbedding(),
        "model.layers.*.input_layernorm": Norm(rms=True),
        "model.layers.*.post_attention_layernorm": Norm(rms=True),
        "model.layers.*.self_attn": Heads(),
        "model.layers.*.self_attn.q_proj": Column(),
        "model.layers.*.self_attn.k_proj": Column(),
        "model.layers.*.self_attn.v_proj": Column(),
        "model.layers.*.self_attn.o_proj": Row(),
        "model.layers.*.mlp.gate_proj": Column(),
        "model.layers.*.mlp.up_proj": Column(),
        "model.layers.*.mlp.down_proj": Row(),
        "model.norm": Norm(rms=True),
        "lm_head": Column(),
    },
    blocks="model.layers", embed_modules=("model.embed_tokens",), head_modules=("model.norm", "lm_head"),
    embed=_llama_embed, block=_llama_block, head=_llama_head,
    tied=("model.embed_tokens.weight", "lm_head.weight"), check=_llama_check,
    dropout_keys=("attention_dropout",), kv_heads_key="num_key_value_heads")


# ---------------------------------------------------------------------------------------------- OPT

_OPT_POSITION_OFFSET = 2      # OPT's position table keeps two rows before position 0


def _opt_embed(m, ids, positions):
    d = m.model.decoder
    x = d.embed_tokens(ids)
    if d.project_in is not None:
        x = d.project_in(x)
    return x + d.embed_positions(positions + _OPT_POSITION_OFFSET)


def _opt_block(m, layer, x, positions, cache=None, mask=None):
    return layer(x, position_ids=_rows(positions), cache=cache, attention_mask=mask)


def _opt_head(m, x):
    d = m.model.decoder
    if d.final_layer_norm is not None:
        x = d.final_layer_norm(x)
    if d.project_out is not None:
        x = d.project_out(x)
    return m.lm_head(x)


def _opt_check(config, mode) -> None:
    if config.word_embed_proj_dim != config.hidden_size and mode.size > 1:
        _refuse("OPT", f"word_embed_proj_dim={config.word_embed_proj_dim} differs from hidden_size="
                f"{config.hidden_size}", "its projections in and out are not split; use parallel.tp=1")
    if not getattr(config, "layer_norm_elementwise_affine", True):
        _refuse("OPT", "layer_norm_elementwise_affine=false", "LayerNorms without a scale")
    if getattr(config, "layerdrop", 0.0):
        _refuse("OPT", f"layerdrop={config.layerdrop}", "set it to 0")


OPT = ParallelPlan(
    family="OPT", classes=("OPTForCausalLM",), checked_with=CHECKED_WITH,
    layers={
        "model.decoder.embed_tokens": VocabEmbedding(),
        "model.decoder.embed_positions": PositionTable(),
        "model.decoder.layers.*.self_attn_layer_norm": Norm(),
        "model.decoder.layers.*.final_layer_norm": Norm(),
        "model.decoder.layers.*.self_attn": Heads(counts=("num_heads",), widths=("embed_dim",)),
        "model.decoder.layers.*.self_attn.q_proj": Column(),
        "model.decoder.layers.*.self_attn.k_proj": Column(),
        "model.decoder.layers.*.self_attn.v_proj": Column(),
        "model.decoder.layers.*.self_attn.out_proj": Row(),
        "model.decoder.layers.*.fc1": Column(),
        "model.decoder.layers.*.fc2": Row(),
        "model.decoder.final_layer_norm": Norm(),
        "lm_head": Column(),
    },
    blocks="model.decoder.layers",
    embed_modules=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    head_modules=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    embed=_opt_embed, block=_opt_block, head=_opt_head,
    tied=("model.decoder.embed_tokens.weight", "lm_head.weight"), check=_opt_check,
    dropout_keys=("dropout", "attention_dropout"), init_std_keys=("init_std",),
    optional=("model.decoder.final_layer_norm",))


PLANS = {plan.classes[0]: plan for plan in (GPT2, LLAMA, OPT)}


def version_note() -> str:
    """Nothing where the installed transformers is the one the plans were checked with, else a sentence
    saying which is installed (the plans refuse a model whose modules moved; one that computes
    differently under the same names would not be caught)."""
    import transformers

    installed = ".".join(transformers.__version__.split(".")[:2])
    if installed == CHECKED_WITH.split()[-1]:
        return ""
    return f"the plans were checked with {CHECKED_WITH}; transformers {transformers.__version__} is installed"


def plan_for(architecture: str) -> ParallelPlan:
    """The plan of a model class (a config's `architectures[0]`), or one refusal naming those there are."""
    plan = PLANS.get(architecture)
    if plan is None:
        raise LoomError(f"no parallel plan for {architecture}; Loom has plans for {', '.join(PLANS)} "
                        f"(checked with {CHECKED_WITH}); see core/hf/families.py to write one")
    return plan

"""1D tensor parallelism for transformers models that run inside someone else's code (a
LightningModule's `training_step` calling `self.model(input_ids, labels=...)`), under their own
forward.

`spread_inplace(module, mode)` finds each transformers causal LM among `module`'s submodules that a
plan covers and applies the plan's split layers only (column and row linears, the vocabulary
embedding, the attention's heads): what 1D tensor parallelism leaves replicated (norms, position
tables, dropout) stays transformers' own, so the model's forward runs unchanged. The head's
vocabulary-split logits are gathered as they leave it (`gather_from`: each rank gets the gradient
of its own part back), so the caller's loss sees whole logits. GPT-2 is refused: its Conv1D
weights are stored transposed in Loom's layout, and a checkpoint of it would not load back into a
plain GPT2LMHeadModel.
"""

from __future__ import annotations

from torch import nn

from core.errors import LoomError
from core.hf import attention
from core.hf.causal_lm import check_split
from core.hf.families import PLANS
from core.hf.plan import Column, Heads, Row, VocabEmbedding, apply_plan
from core.tensor import TPMode
from core.tensor.functional import gather_from


def spread_inplace(module: nn.Module, mode: TPMode) -> list[str]:
    """Spread every planned transformers causal LM inside `module` over `mode` (1D); returns their
    names. Refuses a module with none, or a mode other than 1D."""
    if mode.name != "1d":
        raise LoomError(f"parallel.tp_mode={mode.name}: a model under its own forward code is spread with 1D "
                        f"tensor parallelism only (the 2D, 2.5D and 3D modes split every activation)")
    found = [(name, sub) for name, sub in module.named_modules() if type(sub).__name__ in PLANS]
    if not found:
        raise LoomError(f"parallel.tp={mode.size}: {type(module).__name__} holds no transformers model Loom has a plan "
                        f"for ({', '.join(PLANS)}); tensor parallelism splits the layers those plans name")
    for name, model in found:
        plan = PLANS[type(model).__name__]
        if plan.family == "GPT-2":
            raise LoomError(f"{name or type(module).__name__} is a GPT2LMHeadModel: its Conv1D weights are kept "
                            f"transposed when split, so a checkpoint would not load back into transformers; use "
                            f"parallel.tp=1 for it, or train it with apps.gpt (model.hf), which converts them")
        check_split(model.config, plan, mode, None)
        model.set_attn_implementation(attention.register())
        apply_plan(model, plan, mode, only=(Column, Row, VocabEmbedding, Heads))
        head = model.get_submodule(plan.tied[1].rpartition(".")[0])
        head.register_forward_hook(lambda _m, _args, logits: gather_from(logits, mode.axis))
    return [name for name, _ in found]

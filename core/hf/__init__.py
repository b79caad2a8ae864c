"""Bring your own Hugging Face model: declarative parallel plans (`plan`), the plans of GPT-2,
Llama and OPT (`families`), the attention they run (`attention`), the planned model as a Loom
model (`causal_lm.HFCausalLM`) and its weights in and out of transformers' folders (`weights`)."""

from core.hf.causal_lm import HFCausalLM, load_config
from core.hf.families import PLANS, plan_for
from core.hf.plan import ParallelPlan, apply_plan

__all__ = ["HFCausalLM", "PLANS", "ParallelPlan", "apply_plan", "load_config", "plan_for"]

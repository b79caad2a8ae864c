"""Sequence parallelism: a sequence split across the ranks of the `sp` axis, with attention by a
ring of key/value blocks or by all-to-all (`attention.py`), and the context a model uses to take
its tokens, positions and loss (`SequenceParallel`)."""

from core.sequence.attention import all_to_all_attention, ring_attention
from core.sequence.context import SequenceParallel

__all__ = ["SequenceParallel", "all_to_all_attention", "ring_attention"]

"""Generation with weights in memory or streamed from host memory and NVMe (`engine`, `stream`),
a KV cache on the device or the host (`steps`), and the placement that picks where each lives
(`placement`)."""

from core.inference.steps import InferenceLayer, KVCache, Step, make_step

__all__ = ["InferenceLayer", "KVCache", "Step", "make_step"]

"""The `gemini` plugin: the `zero` engine with its chunks placed across device, host and NVMe.

Chosen by `parallel.offload=cpu|nvme` or a device budget (`memory.device_gb`). Parameters are
packed into chunks that move between the compute device (under the budget; the placement
policy picks what leaves) and their home (host memory, or NVMe files with offload=nvme);
fp32 master weights, Adam moments and gradient shards live in host memory or on NVMe and are
updated there by the C++ CPU Adam. Over several data-parallel ranks it shards like ZeRO stage 3
unless `parallel.zero` says otherwise.
"""

from __future__ import annotations

from core.booster.zero import ZeroPlugin


class GeminiPlugin(ZeroPlugin):
    name = "gemini"

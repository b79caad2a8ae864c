"""`python -m tests.reliability.inject [key=value ...]`: the GPT app with a fault that cannot be
caused from outside the process, chosen by an environment variable:

    RELIABILITY_NAN_AT=K       the loss of the K-th training micro-batch (counted in this
                               process; evaluation does not count) is NaN
    RELIABILITY_ENOSPC=TEXT    saving a file whose path contains TEXT and ends with its last
                               '/'-separated part fails with ENOSPC, as on a full disk
"""

import errno
import os

import torch

import apps.gpt.pretrain as pretrain
from core import cli


def _nan_at(k: int) -> None:
    real = pretrain.next_token_loss
    seen = {"n": 0}

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        if torch.is_grad_enabled():
            seen["n"] += 1
            if seen["n"] == k:
                return value * float("nan")
        return value

    pretrain.next_token_loss = loss


def _enospc(text: str) -> None:
    real = torch.save
    folder, _, name = text.rpartition("/")

    def save(obj, f, *args, **kwargs):
        path = str(getattr(f, "name", f))       # a path, or the file object Loom writes through
        if folder in path and path.endswith(name):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(obj, f, *args, **kwargs)

    torch.save = save


if __name__ == "__main__":
    if os.environ.get("RELIABILITY_NAN_AT"):
        _nan_at(int(os.environ["RELIABILITY_NAN_AT"]))
    if os.environ.get("RELIABILITY_ENOSPC"):
        _enospc(os.environ["RELIABILITY_ENOSPC"])
    cli.run_main(pretrain.main)

"""The README's worked example of a new app trains the same from the same code under every layout
it names: one process, ddp on 2 ranks, ZeRO-3 with NVMe offload, and 1D tensor parallelism on 2
ranks (the checkpoints' unsplit weights after 4 AdamW steps agree to 1e-5)."""

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from core.distributed.testing import run_distributed
from tests.core import example_app

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["train.steps=4", "train.micro_batch=8", "train.global_batch=16", "train.progress=false",
         "optim.lr=0.01", "parallel.device=cpu", "train.warmup_steps=0"]


def _run(out: str, *layout: str) -> dict:
    summary = example_app.main([f"output.dir={out}", *STEPS, *layout])
    return {"loss": summary["loss"], "weights": load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))}


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (k, (a[k] - b[k]).abs().max())


def test_one_app_under_every_layout(tmp_path):
    one = _run(str(tmp_path / "one"))
    offload = _run(str(tmp_path / "zero3"), "parallel.zero=3", "parallel.offload=nvme", "memory.chunk_mb=0.001",
                   f"memory.nvme_dir={tmp_path / 'nvme'}")
    ddp = run_distributed(_run, 2, (str(tmp_path / "ddp"), "parallel.dp=2"))[0]
    tp = run_distributed(_run, 2, (str(tmp_path / "tp"), "parallel.tp=2"))[0]
    for other in (offload, ddp, tp):
        _close(one["weights"], other["weights"])
        assert abs(other["loss"] - one["loss"]) <= 1e-5 * abs(one["loss"])
    assert one["weights"]["fc1.weight"].shape == (64, 16)       # unsplit, whatever the layout


def test_the_readme_shows_this_code():
    """README's "Adding an app" quotes the example's model and train function as they are here."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Adding an app.*?```python\n(.*?)```", readme, flags=re.S)
    assert block, "README has no 'Adding an app' section with a python block"
    source = (ROOT / "tests" / "core" / "example_app.py").read_text()
    for line in block.group(1).splitlines():
        if line.strip() and not line.startswith("#"):
            assert line in source, line

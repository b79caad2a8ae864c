"""Shared runs: the tiny GPT recipe of benchmarks/reliability.py, left alone once per session."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks.reliability import App, final_weights, losses, write_corpus


@dataclass
class Reference:
    out: Path
    losses: list
    weights: dict[str, torch.Tensor]


def _reference(app: App, out: Path) -> Reference:
    r = app.run(out)
    assert r.returncode == 0, r.stderr
    return Reference(out, losses(out), final_weights(out))


@pytest.fixture(scope="session")
def app(tmp_path_factory):
    """One process (forked from the harness's forkserver, which imported torch already: a kill is
    a real SIGKILL of a real process); 8 steps, a checkpoint every 2, an evaluation every 4, dropout on."""
    root = tmp_path_factory.mktemp("reliability")
    return App(write_corpus(root / "corpus"), root / "cache", forked=True)


@pytest.fixture(scope="session")
def unbroken(app, tmp_path_factory):
    return _reference(app, tmp_path_factory.mktemp("unbroken") / "run")


@pytest.fixture(scope="session")
def app_dp2(app):
    """The same recipe on 2 data-parallel ranks under torchrun (a collective waits at most 30 s)."""
    return App(app.corpus, app.cache, nproc=2, extra=["parallel.dp=2", "parallel.timeout_s=30"])


@pytest.fixture(scope="session")
def unbroken_dp2(app_dp2, tmp_path_factory):
    return _reference(app_dp2, tmp_path_factory.mktemp("unbroken_dp2") / "run")

"""The capacity benchmark's search and model family (the capped runs themselves are the benchmark)."""

import subprocess

import pytest
import torch

import benchmarks.memory_capacity as memory_capacity
import loom_kernels.cpu_adam as cpu_adam
from apps.gpt.config import GPTModelConfig
from apps.gpt.model import GPT
from benchmarks.memory_capacity import estimate, family, largest, params_of


@pytest.mark.parametrize("k", [1, 3, 14, 49])
def test_params_of_counts_the_family_model(k):
    with torch.device("meta"):
        model = GPT(GPTModelConfig(**family(k)))
    assert params_of(k) == model.num_params()


@pytest.mark.parametrize("answer", [0, 1, 2, 7, 13, 14, 15, 40, 96])
@pytest.mark.parametrize("start", [1, 9, 14, 50, 96])
def test_largest_finds_the_boundary_from_any_start(answer, start):
    tried = []

    def fits(k):
        tried.append(k)
        return k <= answer

    assert largest(fits, start, 96) == answer
    assert len(tried) == len(set(tried))          # never the same size twice
    assert len(tried) <= 16


def test_a_good_estimate_costs_two_trials():
    start = estimate(16, 2.65 * 2**30, 96)          # 3 GiB cap minus 0.35 GiB of runtime
    assert start == 15
    tried = []
    assert largest(lambda k: tried.append(k) or k <= 14, start, 96) == 14   # as measured: 15 is over the cap
    assert tried == [15, 14]


def test_the_kernel_is_built_in_the_parent_before_any_capped_child(monkeypatch, tmp_path, capsys):
    """A compiler started inside the cap can be killed mid-build (that left a lock every later load
    waited on): the parent builds or loads the C++ CPU Adam before it makes the cap."""
    events = []

    class Cap:   # records what happens instead of making a cgroup; every child is "killed"
        def __init__(self, nbytes):
            events.append("cap")

        def run(self, argv, timeout):
            events.append("child")
            return subprocess.CompletedProcess(argv, 137, "", "")

        def peak(self):
            return None

        def reset_peak(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(cpu_adam, "load", lambda: events.append("kernel") or object())
    monkeypatch.setattr(cpu_adam, "build_report", lambda: "C++ CPU Adam ready: (test)")
    monkeypatch.setattr(memory_capacity, "MemoryCap", Cap)
    monkeypatch.setattr(memory_capacity.signal, "signal", lambda *args: None)   # keep pytest's SIGTERM
    with pytest.raises(SystemExit, match="fits no model"):
        memory_capacity.main(["--quick", "--nvme-dir", str(tmp_path)])
    assert events[:2] == ["kernel", "cap"] and events.count("kernel") == 1 and "child" in events, events
    assert "C++ CPU Adam ready" in capsys.readouterr().err

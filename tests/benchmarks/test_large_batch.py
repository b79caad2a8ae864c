"""The large-batch benchmark's quick mode: its JSON lines and the consistency of what they record.
(Whether LAMB reproduces the paper's effect is the benchmark's finding, not asserted here.)"""

import contextlib
import io
import json
import math

import pytest

from apps.gpt.config import GPTRecipe
from apps.gpt.model import GPT
from benchmarks.large_batch import (BASE_RECIPE, LARGE_RECIPE, QUICK, QUICK_OVERRIDES, Run, batch_of, main,
                                    noise_scale, noise_windows, setup, train, val_loss)
from core.config import load_recipe


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LOOM_CACHE", str(tmp_path_factory.mktemp("cache")))   # a fresh, private token cache
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            assert main(["--quick"]) == 0
    finally:
        mp.undo()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _first_reach(curve, target):
    return next((step for step, loss in curve if step > 0 and loss <= target), None)


def test_lines_and_their_fields(lines):
    assert [line["name"] for line in lines] == ["large_batch_lamb_target", "large_batch_lamb_steps",
                                                 "large_batch_lamb_steps", "large_batch_lamb_summary"]
    assert [line.get("optimizer") for line in lines[1:3]] == ["adamw", "lamb"]
    for line in lines:
        assert {"name", "value", "unit", "baseline", "machine"} <= line.keys()
        assert {"python", "torch", "cores", "threads"} <= line["machine"].keys()


def test_target_is_the_baselines_final_validation_loss(lines):
    target = lines[0]
    curve = target["curve"]
    assert target["steps"] == QUICK["steps"] and target["batch"] == QUICK["batch"]
    assert [step for step, _ in curve][0] == 0 and curve[-1][0] == target["steps"]
    assert all(a[0] < b[0] for a, b in zip(curve, curve[1:]))
    assert all(math.isfinite(loss) for _, loss in curve)
    assert target["value"] == curve[-1][1]


def test_large_batch_runs_follow_the_rule_and_stop_at_the_target(lines):
    target, n, b = lines[0]["value"], lines[0]["steps"], lines[0]["batch"]
    k = batch_of(load_recipe(GPTRecipe, LARGE_RECIPE)) // batch_of(load_recipe(GPTRecipe, BASE_RECIPE))
    for line in lines[1:3]:
        assert line["target"] == target
        assert line["batch"] == k * b
        assert line["lr"] == pytest.approx(line["base_lr"] * math.sqrt(k))
        assert line["limit"] == n // 8 and line["goal"] == n // 12
        curve, steps = line["curve"], line["value"]
        assert curve[0] == lines[0]["curve"][0]            # same initial weights, same held-out set
        assert [step for step, _ in curve] == list(range(len(curve)))   # evaluated after every step
        assert steps == _first_reach(curve, target)
        assert line["reached"] == (steps is not None)
        if steps is None:
            assert curve[-1][0] == line["limit"] or line["diverged"]
        else:
            assert 1 <= steps <= line["limit"] and curve[-1][0] == steps
    assert lines[1]["base_lr"] == lines[0]["lr"]            # AdamW's base is the baseline's own lr


def test_summary_agrees_with_the_runs(lines):
    target, adamw, lamb, summary = lines
    assert summary["adamw_steps"] == adamw["value"] and summary["lamb_steps"] == lamb["value"]
    assert summary["value"] == lamb["value"] and summary["target"] == target["value"]
    assert summary["limit"] == target["steps"] // 8 and summary["goal"] == target["steps"] // 12
    ls, as_ = summary["lamb_steps"], summary["adamw_steps"]
    assert summary["lamb_within_goal"] == (ls is not None and ls <= summary["goal"])
    assert summary["lamb_beats_adamw"] == (ls is not None and (as_ is None or ls < as_))


def test_the_recipe_is_the_tiny_one_at_16x_the_batch():
    tiny, large = load_recipe(GPTRecipe, BASE_RECIPE), load_recipe(GPTRecipe, LARGE_RECIPE)
    assert batch_of(large) == 16 * batch_of(tiny)
    assert large.model == tiny.model and large.data == tiny.data
    assert large.optim.name == "lamb" and large.optim.weight_decay == 0.01
    assert 0 < large.train.warmup_steps <= 0.1 * large.train.steps


def test_a_run_stops_at_the_first_evaluation_that_reaches_its_target(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path))
    s, _ = setup(QUICK_OVERRIDES, QUICK["val_windows"])
    untrained = val_loss(GPT(s.cfg.model), s)   # any weights: the first evaluation after step 1 is below this + 1
    r = train(s, Run(s.cfg.optim, batch=4, steps=5, warmup=0, eval_every=1, target=untrained + 1.0), "test")
    assert r.reached == 1 and [step for step, _ in r.curve] == [0, 1]
    r = train(s, Run(s.cfg.optim, batch=4, steps=3, warmup=0, eval_every=2, target=-1.0), "test")
    assert r.reached is None and [step for step, _ in r.curve] == [0, 2, 3]


def test_a_warm_start_is_where_every_measured_run_begins(tmp_path, monkeypatch):
    """--warm-start: the measured runs start from the warm-up run's weights (their step-0 loss is
    its final one) and draw the batches after the ones it used."""
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path))
    s, _ = setup(QUICK_OVERRIDES, QUICK["val_windows"])
    warm = train(s, Run(s.cfg.optim, batch=4, steps=3, warmup=0, eval_every=3), "warm")
    fresh = train(s, Run(s.cfg.optim, batch=4, steps=1, warmup=0, eval_every=1), "fresh")
    s.init, s.skip = warm.state, 3 * 4
    r = train(s, Run(s.cfg.optim, batch=4, steps=1, warmup=0, eval_every=1), "from warm")
    assert r.curve[0][1] == warm.curve[-1][1] != fresh.curve[0][1]
    s.skip = 0                                   # the same start on the warm-up's own first batch
    again = train(s, Run(s.cfg.optim, batch=4, steps=1, warmup=0, eval_every=1), "from warm, first batch")
    assert again.curve[1][1] != r.curve[1][1]


def test_a_warm_start_hands_its_adam_moments_to_both_optimizers(tmp_path, monkeypatch):
    """The measured runs continue the warm-up's moments (as resuming a checkpoint would) unless
    --fresh-moments: AdamW and LAMB alike count their steps on from the warm-up's."""
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path))
    s, large = setup(QUICK_OVERRIDES, QUICK["val_windows"])
    warm = train(s, Run(s.cfg.optim, batch=4, steps=3, warmup=0, eval_every=3), "warm")
    assert warm.moments and {step for step, _, _ in warm.moments.values()} == {3}
    s.init, s.skip, s.moments = warm.state, 3 * 4, warm.moments
    for optim in (s.cfg.optim, large.optim):
        r = train(s, Run(optim, batch=4, steps=2, warmup=0, eval_every=2), "from warm")
        assert set(r.moments) == set(warm.moments)
        assert {step for step, _, _ in r.moments.values()} == {5}
        name = next(iter(warm.moments))
        _, m0, _ = warm.moments[name]
        _, m2, _ = r.moments[name]
        assert not m2.equal(m0) and m0.equal(s.moments[name][1])   # moved on; the warm-up's copy untouched
    s.moments = None
    r = train(s, Run(s.cfg.optim, batch=4, steps=2, warmup=0, eval_every=2), "fresh moments")
    assert {step for step, _, _ in r.moments.values()} == {2}


def test_the_noise_scale_is_zero_when_every_window_gives_the_same_gradient(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path))
    s, _ = setup(QUICK_OVERRIDES, QUICK["val_windows"])
    model = GPT(s.cfg.model)
    windows = noise_windows(s, 8)
    varied = noise_scale(model, windows)
    assert 0 < varied < math.inf
    assert abs(noise_scale(model, windows[:1].repeat(4, 1))) < 1e-6 * varied

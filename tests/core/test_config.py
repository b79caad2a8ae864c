"""Recipes: loading, overrides and the one-line errors for bad input."""

from pathlib import Path

import pytest

from apps.gpt.config import GPTRecipe
from core.config import ConfigError, Recipe, describe, iter_fields, known_recipes, load_recipe, to_yaml


def test_defaults_recipe_and_overrides_merge_in_order():
    cfg = load_recipe(GPTRecipe, "gpt/tiny", ["train.steps=7", "optim.betas=[0.8,0.9]", "parallel.precision=bf16"])
    assert cfg.train.steps == 7                 # override
    assert cfg.model.d_model == 128             # recipe
    assert cfg.train.keep_checkpoints == 2      # schema default
    assert cfg.optim.betas == [0.8, 0.9] and cfg.parallel.precision == "bf16"
    assert {"gpt/tiny", "gpt/gpt2-124m"} <= set(known_recipes())


def test_recipe_by_path_and_extends(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  steps: 11\n  micro_batch: 3\nmodel:\n  n_layer: 2\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ntrain:\n  steps: 5\n")
    cfg = load_recipe(GPTRecipe, str(child))
    assert (cfg.train.steps, cfg.train.micro_batch, cfg.model.n_layer) == (5, 3, 2)
    by_name = tmp_path / "by_name.yaml"
    by_name.write_text("extends: gpt/tiny\ntrain:\n  steps: 9\n")
    cfg = load_recipe(GPTRecipe, by_name)
    assert cfg.train.steps == 9 and cfg.model.d_model == 128


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_recipe(GPTRecipe, "gpt/tiny", ["train.steps=3"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_recipe(GPTRecipe, path) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["train.setps=3"], "unknown key 'train.setps' (on the command line); did you mean 'train.steps'?"),
    (["steps=3"], "unknown key 'steps' (on the command line); did you mean 'train.steps'?"),
    (["parallel.precison=bf16"], "did you mean 'parallel.precision'?"),
    (["model.zzzz=1"], "unknown key 'model.zzzz' (on the command line)"),
    (["train.steps=abc"], "train.steps (on the command line): got 'abc'; allowed: a value of type int"),
    (["optim.lr=fast"], "optim.lr (on the command line): got 'fast'; allowed: a value of type float"),
    (["train.steps=0"], "train.steps: got 0; allowed: at least 1"),
    (["model.dropout=1.5"], "model.dropout: got 1.5; allowed: between 0.0 and 0.9"),
    (["parallel.precision=fp8"], "parallel.precision: got 'fp8'; allowed: 'fp32', 'bf16', 'fp16'"),
    (["parallel.tp_mode=2D"], "did you mean '2d'?"),
    (["parallel.zero=4"], "parallel.zero: got 4; allowed: 0, 1, 2, 3"),
    (["train=5"], "train (on the command line): got 5; allowed: a section with keys steps, micro_batch"),
    (["train.steps"], "override 'train.steps' is not of the form key=value"),
    (["model.n_head=5"], "model.n_head: got 5; allowed: a divisor of model.d_model (128)"),
    (["optim.betas=[0.9]"], "optim.betas: got [0.9]; allowed: two numbers in [0, 1)"),
])
def test_bad_values_fail_with_one_line_naming_key_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(GPTRecipe, "gpt/tiny", overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="recipe 'gpt/tiy' not found .*did you mean 'gpt/tiny'"):
        load_recipe(GPTRecipe, "gpt/tiy")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+ is not valid YAML"):
        load_recipe(GPTRecipe, bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian' \(in .*typo.yaml\); did you mean 'train'"):
        load_recipe(GPTRecipe, typo)
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back on itself"):
        load_recipe(GPTRecipe, loop)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_recipe(GPTRecipe, scalar)


def test_help_describes_every_key_with_default_and_meaning():
    text = describe(GPTRecipe, load_recipe(GPTRecipe, "gpt/tiny"))
    for key, field, _ in iter_fields(GPTRecipe):
        assert f"  {key} (" in text, key
        assert field.metadata["help"] in text
    assert "train.steps (int [1..]; default 100, recipe 400)" in text
    assert "parallel.precision (str {fp32|bf16|fp16}; default 'fp32')" in text


def test_every_shipped_recipe_is_valid():
    recipes = Path(__file__).resolve().parents[2] / "recipes"
    for path in sorted(recipes.glob("gpt/*.yaml")):
        load_recipe(GPTRecipe, path)


def test_a_renamed_value_still_works_with_one_line_saying_so(capsys):
    cfg = load_recipe(Recipe, None, ["optim.name=hybrid_adam"])
    assert cfg.optim.name == "cpu_adam"
    assert capsys.readouterr().err == ("note: optim.name=hybrid_adam is now called optim.name=cpu_adam; "
                                       "the old name still works\n")

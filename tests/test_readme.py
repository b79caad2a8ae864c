"""The README's commands stay true: every entry-point line parses and every recipe it names exists.

The commands themselves run in other tests (the 3-step default run, torchrun, generate); here
each line of the README is checked against the code so that renaming a key or a recipe
breaks the build instead of the documentation.
"""

import re
import shlex
from pathlib import Path

import pytest

from apps.diffusion.config import DiffusionRecipe
from apps.diffusion.sample import parse_args as sample_args
from apps.gpt.config import GPTRecipe
from apps.gpt.generate import parse_args as generate_args
from core.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)
          if lang in ("bash", "yaml", "text", "")]
LINES = [line.split("#")[0].strip() for block in BLOCKS for line in block.splitlines()]


def _entry_lines(module: str) -> list[list[str]]:
    found = []
    for line in LINES:
        words = shlex.split(line) if line else []
        if module in words:
            found.append(words[words.index(module) + 1:])
    return found


def test_readme_shows_the_two_commands_and_the_makefile_has_them():
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in README and "make test" in README
    for target in re.findall(r"^make (\w+)", "\n".join(LINES), flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
    assert "make test" in (ROOT / ".ci" / "run").read_text()


ENTRY_POINTS = [("apps.gpt.pretrain", GPTRecipe, "gpt/tiny", []),
                 ("apps.diffusion.finetune", DiffusionRecipe, "diffusion/tiny-shapes", []),
                 ("apps.diffusion.train", DiffusionRecipe, "diffusion/tiny-shapes", ["model.unet_init=random"])]
RECIPE_LINES = [(module, schema, default, pre, args) for module, schema, default, pre in ENTRY_POINTS
                for args in _entry_lines(module)]


@pytest.mark.parametrize("module, schema, default, pre, args", RECIPE_LINES,
                         ids=[f"{m} {' '.join(a)}" for m, _, _, _, a in RECIPE_LINES])
def test_every_entry_point_line_is_a_valid_recipe(module, schema, default, pre, args, tmp_path):
    if args == ["--help"]:
        return
    recipe = default
    if "--recipe" in args:
        i = args.index("--recipe")
        recipe = args[i + 1]
        args = args[:i] + args[i + 2:]
    if recipe == "plan.yaml":            # the plan the README's `core.plan ... --out plan.yaml` line writes
        recipe = _plan(tmp_path)
    load_recipe(schema, recipe, pre + args)


def _plan(tmp_path) -> str:
    from core.plan import main as plan

    line = next(words for words in _entry_lines("core.plan") if "--out" in words)
    out = tmp_path / "plan.yaml"
    assert plan([str(out) if w == "plan.yaml" else w for w in line if w != "--explain"]) == 0
    return str(out)


def test_every_planner_line_names_a_recipe_and_a_cluster_that_exist(tmp_path):
    from core.autoparallel.cluster import find_cluster

    lines = _entry_lines("core.plan")
    assert lines
    for words in lines:
        if words[0] == "calibrate":
            continue
        find_cluster(words[words.index("--cluster") + 1])
    assert "parallel.auto=true" in README and "core.plan calibrate" in README
    assert load_recipe(GPTRecipe, _plan(tmp_path)).parallel.offload in ("cpu", "nvme")


def test_every_entry_point_appears_in_the_readme():
    assert {m for m, *_ in RECIPE_LINES} == {m for m, *_ in ENTRY_POINTS}


def test_every_generate_and_sample_line_parses():
    from apps.gpt.generate import parse_settings

    for module, parse in (("apps.gpt.generate", generate_args), ("apps.diffusion.sample", sample_args)):
        lines = _entry_lines(module)
        assert lines, module
        for args in lines:
            parsed = parse(args)
            if module == "apps.gpt.generate":
                parse_settings(parsed.settings)           # its key=value settings are known keys


def test_recipes_named_in_the_readme_exist(tmp_path):
    names = set(re.findall(r"(?:--recipe |extends: |`)((?:gpt|diffusion)/[\w-]+)", README))
    assert {"gpt/tiny", "gpt/gpt2-124m", "diffusion/tiny-shapes", "diffusion/sd15-lora"} <= names
    for name in names:
        load_recipe(GPTRecipe if name.startswith("gpt/") else DiffusionRecipe, name)
    # the `extends` example is a working recipe
    example = next(b for b in BLOCKS if b.startswith("extends:") and "n_layer: 6" in b)
    (tmp_path / "mine.yaml").write_text(example)
    cfg = load_recipe(GPTRecipe, tmp_path / "mine.yaml")
    assert cfg.model.n_layer == 6 and cfg.train.steps == 2000
    # and the worked example of a new domain is the shipped Llama recipe, key for key
    llama = next(b for b in BLOCKS if b.startswith("extends:") and "gpt/models/llama-tiny" in b)
    (tmp_path / "llama.yaml").write_text(llama)
    assert load_recipe(GPTRecipe, tmp_path / "llama.yaml") == load_recipe(GPTRecipe, "gpt/llama-tiny-code")

"""The command line shared by every entry point: `--recipe`, dot-list overrides, `--help`."""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence, TypeVar

from core.config import ConfigError, Recipe, describe, known_recipes, load_recipe
from core.errors import LoomError

T = TypeVar("T", bound=Recipe)


def _usage(prog: str, summary: str, default_recipe: str) -> str:
    return (f"usage: {prog} [--recipe NAME_OR_PATH] [key=value ...]\n\n{summary}\n\n"
            f"  --recipe NAME_OR_PATH  a recipe file, or a name such as {default_recipe} "
            f"(default: {default_recipe})\n"
            f"  key=value              override one recipe key, e.g. train.steps=50 parallel.dp=2\n"
            f"  -h, --help             print this and every recipe key with its default and meaning\n\n"
            f"Known recipes: {', '.join(r for r in known_recipes() if r.split('/')[0] == default_recipe.split('/')[0])}\n"
            f"Many processes: torchrun --standalone --nproc-per-node N -m {prog.split()[-1]} parallel.dp=N")


def parse(schema: type[T], argv: Sequence[str] | None, *, prog: str, summary: str,
          default_recipe: str) -> T | None:
    """The validated recipe for this command line, or None after printing --help."""
    args = list(sys.argv[1:] if argv is None else argv)
    recipe = default_recipe
    overrides: list[str] = []
    want_help = False
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            want_help = True
        elif a == "--recipe":
            if i + 1 >= len(args):
                raise ConfigError("--recipe needs a value: a recipe file or a name such as " + default_recipe)
            recipe = args[i + 1]
            i += 1
        elif a.startswith("--recipe="):
            recipe = a.split("=", 1)[1]
        elif a.startswith("-"):
            raise ConfigError(f"unknown option '{a}'; options are --recipe and --help, "
                              f"everything else is key=value")
        else:
            overrides.append(a)
        i += 1
    if want_help:
        try:
            values = load_recipe(schema, recipe)
        except ConfigError:
            values = None
        print(_usage(prog, summary, default_recipe))
        print(f"\nRecipe keys (recipe shown: {recipe}):")
        print(describe(schema, values))
        return None
    return load_recipe(schema, recipe, overrides)


def run_main(main: Callable[[], int | None]) -> None:
    """Run an entry point; a LoomError ends it with one line on rank 0 and exit status 2."""
    try:
        code = main()
    except LoomError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        sys.exit(0)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("interrupted; the last complete checkpoint is intact", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)

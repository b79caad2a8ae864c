"""Which app a recipe belongs to, and what the planner asks of it.

An app that can be planned for registers an `AppTarget` under the entry-point group `loom.apps`
(its name is the app's recipe folder: `gpt` for `recipes/gpt/...`):

    [project.entry-points."loom.apps"]
    gpt = "apps.gpt.planning:TARGET"

The target names the app's recipe schema and a `profile(recipe)` that makes the model on the meta
device and profiles it (`core.autoparallel.profile.profile_layers`). The engine never imports an
app; it finds them here by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Callable

from core.autoparallel.estimate import Job
from core.autoparallel.profile import ModelProfile
from core.config import ConfigError, Recipe, read_recipe_chain, resolve_recipe

GROUP = "loom.apps"


@dataclass(frozen=True)
class AppTarget:
    name: str                                   # the app's recipe folder
    recipe: type                                # its Recipe subclass
    default_recipe: str
    profile: Callable[[Recipe], ModelProfile]   # the model on the meta device, profiled
    axes: tuple[str, ...] = ("dp", "pp", "tp", "sp")
    checkpointing: bool = True                  # model.gradient_checkpointing exists
    # the axes this recipe's model can use, when some setting rules one out (GPT: no sequence
    # parallelism with dropout); default: `axes`
    axes_for: Callable[[Recipe], tuple[str, ...]] | None = None
    # the highest ZeRO stage this recipe can run over several ranks (diffusion: 2 while validation
    # renders on rank 0 alone); default 3
    max_zero_for: Callable[[Recipe], int] | None = None


def app_targets() -> dict[str, EntryPoint]:
    """The registered apps by name, not yet imported (`target_for` loads the one it needs)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def target_for(recipe: str, app: str = "") -> AppTarget:
    """The target of `app`, or of the app whose recipe folder `recipe` is in (gpt/tiny, or a path
    under recipes/gpt/)."""
    found = app_targets()
    name = app
    if not name:
        try:      # the folder of the recipe, or of one it extends (a plan written by core.plan extends the app's)
            _, chain = read_recipe_chain(resolve_recipe(recipe))
            name = next((p.resolve().parent.name for p in chain if p.resolve().parent.name in found),
                        chain[0].resolve().parent.name)
        except ConfigError:
            name = recipe.split("/")[0]
    if name not in found:
        known = ", ".join(sorted(found)) or "none: is loom-train installed (make setup)?"
        raise ConfigError(f"--recipe {recipe}: no app called {name!r} can be planned for; apps that can: {known} "
                          f"(name one with --app when the recipe is outside recipes/<app>/)")
    target = found[name].load()
    if not isinstance(target, AppTarget):
        raise ConfigError(f"entry point {name!r} of {GROUP} is {type(target).__name__}, not an AppTarget")
    return target


def job_for(target: AppTarget, cfg: Recipe, devices: int) -> Job:
    """The job a recipe asks for: its model's profile, its global batch (train.global_batch, or what
    micro_batch x grad_accum makes on `devices` data-parallel ranks), precision and update rule."""
    t = cfg.train
    global_batch = t.global_batch or t.micro_batch * t.grad_accum * devices
    axes = target.axes_for(cfg) if target.axes_for else target.axes
    return Job(target.profile(cfg), global_batch, cfg.parallel.precision, cfg.optim.name, axes,
               target.checkpointing, cfg.memory.chunk_mb, target.max_zero_for(cfg) if target.max_zero_for else 3)

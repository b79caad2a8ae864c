"""Recipes: typed schemas, YAML loading, command-line overrides and validation.

A recipe is a YAML file that describes a whole run. Its schema is a tree of dataclasses: the
sections every app shares (`train`, `parallel`, `optim`, `output`) live here, and each app adds
its own `model` and `data` sections by subclassing `Recipe`. Every field carries its meaning
and its allowed range in the field's metadata (see `opt`), which drives both `--help` and the
validation, so the two can never disagree.

Loading goes: schema defaults <- recipe file (and the files it `extends`) <- dot-list
overrides from the command line. Anything wrong (an unknown key, a value of the wrong type, a
value out of range) raises `ConfigError` with one line that names the key, the bad value and
what is allowed, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.errors import LoomError

T = TypeVar("T", bound="Recipe")

REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(LoomError, ValueError):
    """A user-facing problem with a recipe or an override, described in one line."""


def opt(default: Any, help: str, *, min: float | None = None, max: float | None = None,
        choices: Sequence[Any] | None = None, renamed: dict[str, str] | None = None) -> Any:
    """A schema field with its meaning and its allowed values.

    `min`/`max` bound numbers (inclusive); `choices` lists the allowed values; `renamed` maps
    values an earlier Loom accepted to today's names (they still work, with one line saying so).
    """
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None,
            "renamed": dict(renamed or {})}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    """A nested schema section."""
    return field(default_factory=cls, metadata={"help": help, "section": True})


# --------------------------------------------------------------------------------------------
# The sections every app shares
# --------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    steps: int = opt(100, "optimizer steps to run in total (a resumed run continues to this count)", min=1)
    micro_batch: int = opt(8, "samples per forward/backward on each data-parallel rank", min=1)
    global_batch: int = opt(0, "samples per optimizer step over all ranks; 0 = micro_batch x dp x grad_accum", min=0)
    grad_accum: int = opt(1, "micro-batches accumulated per step (derived from global_batch when that is set)", min=1)
    lr_schedule: str = opt("cosine", "learning-rate shape after warm-up", choices=("constant", "linear", "cosine"))
    warmup_steps: int = opt(0, "steps of linear warm-up from 0 to optim.lr", min=0)
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of optim.lr (linear, cosine)", min=0.0, max=1.0)
    grad_clip: float = opt(1.0, "clip the global gradient norm to this value; 0 turns clipping off", min=0.0)
    eval_every: int = opt(0, "evaluate every N steps (and at the end); 0 = only at the end", min=0)
    eval_batches: int = opt(8, "global batches per evaluation (the same samples whatever the layout)", min=1)
    checkpoint_every: int = opt(0, "write a checkpoint every N steps (and at the end); 0 = only at the end", min=0)
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep; older ones are deleted", min=1)
    checkpoint_format: str = opt("unsplit", "unsplit: rank 0 writes the whole model (model.safetensors); sharded: every "
                                            "rank writes what it owns (sharded.json + shards/), any layout resumes it",
                                 choices=("unsplit", "sharded"))
    checkpoint_async: bool = opt(False, "write sharded checkpoints in the background while training goes on (each rank "
                                        "keeps a host copy of its part until its files are written)")
    log_every: int = opt(10, "write metrics and refresh the progress bar every N steps", min=1)
    seed: int = opt(0, "seed for weights, data order and dropout", min=0)
    resume: str = opt("", "'' starts fresh; 'latest' continues from the newest checkpoint in output.dir; or a checkpoint folder")
    progress: bool = opt(True, "show a progress bar on rank 0")
    init_weights: str = opt("", "a checkpoint folder whose weights (only) start a fresh run, from any layout "
                                "(unsplit or sharded)")


@dataclass
class LaunchConfig:
    """How a run's processes find their devices and each other (what every app's `parallel`
    section has, training or inference)."""

    device: str = opt("auto", "compute device; auto = cuda when available, else cpu", choices=("auto", "cpu", "cuda"))
    backend: str = opt("auto", "torch.distributed backend; auto = nccl on cuda, gloo on cpu", choices=("auto", "gloo", "nccl"))
    timeout_s: int = opt(1800, "seconds a collective may wait for a peer before the run fails", min=10)


@dataclass
class ParallelConfig(LaunchConfig):
    dp: int = opt(0, "data-parallel size; 0 = whatever the world size leaves after tp x pp x sp", min=0)
    tp: int = opt(1, "tensor-parallel size", min=1)
    tp_mode: str = opt("1d", "tensor-parallel layout", choices=("1d", "2d", "2.5d", "3d"))
    tp_depth: int = opt(1, "depth d of the 2.5d layout (tp = q x q x d)", min=1)
    pp: int = opt(1, "pipeline-parallel size (stages)", min=1)
    pp_schedule: str = opt("1f1b", "pipeline schedule", choices=("gpipe", "1f1b", "interleaved"))
    microbatches: int = opt(0, "micro-batches per pipeline step; 0 = pp", min=0)
    virtual_stages: int = opt(1, "virtual stages per pipeline rank (interleaved schedule)", min=1)
    pp_partition: str = opt("layers", "how layers are cut into stages: equal layer counts, or balanced by parameter "
                                      "count or by each layer's measured time", choices=("layers", "params", "cost"))
    sp: int = opt(1, "sequence-parallel size", min=1)
    sp_mode: str = opt("ring", "sequence-parallel attention", choices=("ring", "all_to_all"))
    zero: int = opt(0, "ZeRO stage: 0 off, 1 optimizer states, 2 + gradients, 3 + parameters", choices=(0, 1, 2, 3))
    offload: str = opt("none", "where optimizer states and parameters may live off the device", choices=("none", "cpu", "nvme"))
    precision: str = opt("fp32", "compute precision (bf16/fp16 use fp32 master weights)", choices=("fp32", "bf16", "fp16"))
    auto: bool = opt(False, "let the planner pick the layout (parallel.*, train.micro_batch, memory.device_gb, "
                            "model.gradient_checkpointing) for this model on parallel.cluster; it prints the plan "
                            "first (python -m core.plan shows it without running)")
    cluster: str = opt("", "the cluster file parallel.auto plans for (python -m core.plan calibrate writes one); "
                           "'' = this machine as the launcher describes it (one node)")


@dataclass
class OptimConfig:
    name: str = opt("adamw", "optimizer: torch's AdamW, cpu_adam (the same update; a C++ kernel for "
                             "CPU-resident weights, torch's fused kernel on GPUs), SGD, or the large-batch "
                             "LAMB (Adam with a per-tensor trust ratio) and LARS (SGD with momentum and a "
                             "per-tensor learning rate); biases and norm gains take plain steps in LAMB/LARS",
                    choices=("adamw", "cpu_adam", "sgd", "lamb", "lars"), renamed={"hybrid_adam": "cpu_adam"})
    lr: float = opt(1e-3, "peak learning rate", min=0.0)
    weight_decay: float = opt(0.1, "weight decay, applied to matrices only (not biases, norms); decoupled "
                                   "for adamw, cpu_adam and lamb, added to the gradient for sgd and lars",
                              min=0.0)
    betas: List[float] = opt([0.9, 0.95], "Adam's and LAMB's (beta1, beta2)")
    eps: float = opt(1e-8, "Adam's and LAMB's epsilon; LARS adds it to its learning-rate denominator", min=0.0)
    momentum: float = opt(0.9, "SGD and LARS momentum (Nesterov off)", min=0.0, max=1.0)
    trust_clamp: float = opt(0.0, "LAMB: upper bound of the trust ratio; 0 = none", min=0.0)
    bias_correction: bool = opt(True, "LAMB: divide the moments by (1 - beta^step) as Adam does")
    trust_coefficient: float = opt(0.001, "LARS: eta, the trust coefficient that scales each tensor's "
                                          "learning rate |w| / (|g| + weight_decay |w|)", min=0.0)


@dataclass
class MemoryConfig:
    chunk_mb: float = opt(32.0, "size of a parameter chunk (parallel.zero=3 or parallel.offload): the unit "
                                "that moves between device, host and NVMe; a larger parameter gets a chunk "
                                "of its own", min=0.0001)
    device_gb: float = opt(0.0, "budget for chunks on the compute device; 0 = no limit "
                                "(on a CPU-only machine the 'device' is the CPU with this budget)", min=0.0)
    policy: str = opt("auto", "auto: fit the budget, evicting the chunk used furthest in the future; "
                              "static: memory.static_fraction of the chunks stays off the device",
                      choices=("auto", "static"))
    static_fraction: float = opt(0.0, "static policy: fraction of parameter chunks kept off the device",
                                 min=0.0, max=1.0)
    nvme_dir: str = opt("", "folder on a fast local disk for parallel.offload=nvme; '' = output.dir/nvme")
    io_threads: int = opt(4, "threads moving chunks to and from host memory and NVMe", min=1)
    prefetch: int = opt(2, "chunks fetched ahead of use, in the order traced in the first step", min=0)
    step_in_backward: bool = opt(False, "update each chunk as soon as its gradient is complete, so gradients "
                                        "are never stored (saves 4 bytes per parameter of host memory or disk "
                                        "and a pass over them); needs train.grad_clip=0, train.grad_accum=1 "
                                        "and parallel.precision fp32 or bf16")


@dataclass
class OutputConfig:
    dir: str = opt("runs/default", "folder for checkpoints, metrics.jsonl and plots")
    overwrite: bool = opt(False, "start a fresh run in an output.dir that already holds checkpoints (deletes them)")


@dataclass
class Recipe:
    """The base of every app's recipe. Apps add `model` and `data` sections."""

    train: TrainConfig = section(TrainConfig, "the training loop")
    parallel: ParallelConfig = section(ParallelConfig, "how the run is spread over processes")
    optim: OptimConfig = section(OptimConfig, "the optimizer")
    memory: MemoryConfig = section(MemoryConfig, "chunked parameters across device, host and NVMe")
    output: OutputConfig = section(OutputConfig, "where results go")

    def check(self) -> None:
        """Cross-field checks; raise ConfigError. Subclasses extend it."""
        if len(self.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.optim.betas):
            raise ConfigError(f"optim.betas: got {list(self.optim.betas)}; allowed: two numbers in [0, 1)")
        if self.train.checkpoint_async and self.train.checkpoint_format != "sharded":
            raise ConfigError("train.checkpoint_async=true needs train.checkpoint_format=sharded (an unsplit "
                              "checkpoint is gathered on rank 0, which a background save cannot overlap)")


@dataclass
class InferenceRecipe:
    """The base of every app's inference recipe (an app adds `model` and `data`): where results
    go, and how its processes join."""

    parallel: LaunchConfig = section(LaunchConfig, "how the processes find their devices and each other")
    output: OutputConfig = section(OutputConfig, "where results go")

    def check(self) -> None:
        """Cross-field checks; raise ConfigError. Subclasses extend it."""


# --------------------------------------------------------------------------------------------
# Walking a schema
# --------------------------------------------------------------------------------------------

def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(cls_field_type: Any) -> bool:
    return dataclasses.is_dataclass(cls_field_type)


def iter_fields(cls: type, prefix: str = ""):
    """Yield (dotted key, dataclass field, type) for every leaf of a schema, depth first."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        ftype = hints[f.name]
        if _is_section(ftype):
            yield from iter_fields(ftype, key + ".")
        else:
            yield key, f, ftype


def _leaf_keys(cls: type) -> list[str]:
    return [key for key, _, _ in iter_fields(cls)]


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin in (list, List):
        (arg,) = typing.get_args(t) or (Any,)
        return f"list of {_type_name(arg)}"
    return getattr(t, "__name__", str(t))


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _suggest(bad_key: str, known: list[str]) -> str:
    """'; did you mean ...?' for the closest known key, or '' when nothing is close."""
    match = difflib.get_close_matches(bad_key, known, n=1, cutoff=0.6)
    if not match:  # the right name under the wrong section, or a typo in the name alone
        by_leaf: dict[str, str] = {}
        for k in known:
            by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
        close = difflib.get_close_matches(bad_key.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.75)
        match = [by_leaf[close[0]]] if close else []
    return f"; did you mean '{match[0]}'?" if match else ""


def _check_keys(raw: Any, cls: type, source: str, root: type, prefix: str = "") -> None:
    """Reject keys the schema does not have, and sections given as plain values."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} ({source}): got {raw!r}; allowed: a mapping of keys")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            known = _leaf_keys(root)
            sections = sorted({k.rsplit(".", 1)[0] for k in known})
            raise ConfigError(f"unknown key '{full}' ({source}){_suggest(full, known + sections)}")
        ftype = hints[key]
        if _is_section(ftype):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} ({source}): got {value!r}; allowed: a section with keys "
                                  f"{', '.join(f.name for f in dataclasses.fields(ftype))}")
            _check_keys(value, ftype, source, root, full + ".")


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every leaf against its field's min/max/choices, then the recipe's own checks."""
    hints = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        key = f"{prefix}{f.name}"
        value = getattr(cfg, f.name)
        if _is_section(hints[f.name]):
            validate(value, key + ".")
            continue
        meta = f.metadata
        new_name = (meta.get("renamed") or {}).get(value) if isinstance(value, str) else None
        if new_name is not None:
            if os.environ.get("RANK", "0") == "0":
                print(f"note: {key}={value} is now called {key}={new_name}; the old name still works",
                      file=sys.stderr)
            value = new_name
            setattr(cfg, f.name, value)
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            by_lower = {str(c).lower(): str(c) for c in choices}
            close = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1)
            hint = f"; did you mean '{by_lower[close[0]]}'?" if close else ""
            raise ConfigError(f"{key}: got {value!r}; allowed: {', '.join(repr(c) for c in choices)}{hint}")
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo or hi is not None and value > hi:
            rng = (f"at least {lo}" if hi is None else f"at most {hi}" if lo is None
                   else f"between {lo} and {hi}")
            raise ConfigError(f"{key}: got {value!r}; allowed: {rng}")
    if not prefix and hasattr(cfg, "check"):
        cfg.check()


# --------------------------------------------------------------------------------------------
# Finding and loading recipes
# --------------------------------------------------------------------------------------------

def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up, in order."""
    dirs = [Path(p) for p in os.environ.get("LOOM_RECIPES", "").split(os.pathsep) if p]
    dirs.append(REPO_ROOT / "recipes")
    dirs.append(Path(sys.prefix) / "share" / "loom-train" / "recipes")
    return [d for d in dirs if d.is_dir()]


def known_recipes() -> list[str]:
    names: set[str] = set()
    for d in recipe_dirs():
        names.update(str(p.relative_to(d).with_suffix("")) for p in d.rglob("*.yaml")
                     if p.relative_to(d).parts[0] != "clusters")     # cluster files: core.plan's --cluster
    return sorted(names)


def resolve_recipe(recipe: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A recipe path, or a name such as `gpt/tiny`, to an existing file."""
    text = str(recipe)
    candidates = [Path(text)]
    if relative_to is not None:
        candidates.insert(0, relative_to / text)
    for d in recipe_dirs():
        candidates.append(d / (text if text.endswith((".yaml", ".yml")) else text + ".yaml"))
    for c in candidates:
        if c.is_file():
            return c
    names = known_recipes()
    close = difflib.get_close_matches(text, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"recipe '{text}' not found (neither a file nor a known name){hint} "
                      f"known recipes: {', '.join(names) or 'none'}")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe {path}{where} is not valid YAML: "
                          f"{getattr(e, 'problem', None) or e}") from None
    except OSError as e:
        raise ConfigError(f"recipe {path} cannot be read: {e.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe_chain(path: Path, _seen: tuple[Path, ...] = ()) -> tuple[dict, list[Path]]:
    """The recipe's contents merged over the recipes it `extends` (a name or a relative path)."""
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in _seen + (path,))
        raise ConfigError(f"recipe 'extends' loops back on itself: {chain}")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data, [path]
    if not isinstance(parent, str):
        raise ConfigError(f"extends ({path}): got {parent!r}; allowed: a recipe name or path")
    base, chain = read_recipe_chain(resolve_recipe(parent, relative_to=path.parent), _seen + (path,))
    return _deep_merge(base, data), chain + [path]


def parse_overrides(overrides: Sequence[str]) -> dict:
    """`key.sub=value` strings to a nested dict (values parsed as YAML: 3, 1e-3, true, [1,2])."""
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override '{bad[0]}' is not of the form key=value (for example train.steps=50)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"override could not be parsed: {e}") from None


@functools.lru_cache(maxsize=None)
def _defaults(schema: type) -> DictConfig:
    """The schema's defaults as OmegaConf's typed tree, made once per schema (28 ms each time);
    never changed: OmegaConf.merge copies it."""
    return OmegaConf.structured(schema)


def _merge(schema: type[T], layers: list[tuple[dict, str]]) -> T:
    merged = _defaults(schema)
    for raw, source in layers:
        _check_keys(raw, schema, source, root=schema)
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(raw))
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            value = getattr(e, "value", None)
            expected = "?"
            for k, _, t in iter_fields(schema):
                if k == key:
                    expected = _type_name(t)
            raise ConfigError(f"{key} ({source}): got {value!r}; allowed: a value of type {expected}") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def load_recipe(schema: type[T], recipe: str | os.PathLike | None = None,
                overrides: Sequence[str] = (), source: str = "on the command line") -> T:
    """Defaults of `schema`, then the recipe file, then the overrides (`source`: where they came
    from, for the errors); validated."""
    layers: list[tuple[dict, str]] = []
    if recipe is not None:
        path = resolve_recipe(recipe)
        data, _ = read_recipe_chain(path)
        layers.append((data, f"in {path}"))
    if overrides:
        layers.append((parse_overrides(overrides), source))
    cfg = _merge(schema, layers)
    validate(cfg)
    return cfg


def with_values(cfg: T, tree: dict, source: str) -> T:
    """`cfg` with the values of a nested mapping set over it (as a recipe layer), validated."""
    merged = _merge(type(cfg), [(dataclasses.asdict(cfg), "the recipe"), (tree, source)])
    validate(merged)
    return merged


def to_yaml(cfg: Any) -> str:
    """The complete, resolved recipe as YAML (what a checkpoint stores beside its weights).

    A recipe holds only plain values, which PyYAML writes as OmegaConf does (the same text for
    every shipped recipe) in a fifth of the time: written at every checkpoint, and by the tests
    thousands of times; anything else goes through OmegaConf."""
    try:
        return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)
    except yaml.representer.RepresenterError:
        return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# --------------------------------------------------------------------------------------------
# Help text
# --------------------------------------------------------------------------------------------

def describe(schema: type, recipe_values: Any | None = None, order: Sequence[str] = (
        "model", "data", "train", "optim", "parallel", "memory", "output")) -> str:
    """Every key with its type, default (and the recipe's value when it differs) and meaning."""
    hints = _field_types(schema)
    sections = sorted((f for f in dataclasses.fields(schema)),
                      key=lambda f: order.index(f.name) if f.name in order else len(order))
    rows: list[str] = []
    for sec in sections:
        if not _is_section(hints[sec.name]):
            continue
        rows.append(f"\n{sec.name}: {sec.metadata.get('help', '')}")
        for key, f, t in iter_fields(hints[sec.name], sec.name + "."):
            default = _default_of(f)
            meta = f.metadata
            allowed = ""
            if meta.get("choices"):
                allowed = " {" + "|".join(str(c) for c in meta["choices"]) + "}"
            elif meta.get("min") is not None or meta.get("max") is not None:
                lo = meta.get("min")
                hi = meta.get("max")
                allowed = f" [{'' if lo is None else lo}..{'' if hi is None else hi}]"
            shown = f"default {default!r}"
            if recipe_values is not None:
                value = recipe_values
                for part in key.split("."):
                    value = getattr(value, part)
                if value != default:
                    shown += f", recipe {value!r}"
            rows.append(f"  {key} ({_type_name(t)}{allowed}; {shown})\n      {meta.get('help', '')}")
    return "\n".join(rows)

"""A PyTorch Lightning strategy: Loom's memory engine and data parallelism for LightningModules.

    import core.integrations.lightning                  # registers strategy="loom"
    from core.integrations.lightning import LoomStrategy

    Trainer(strategy="loom")                            # data parallelism over the devices, as ddp
    Trainer(strategy=LoomStrategy(zero=3, offload="nvme", memory={"device_gb": 2}))
    Trainer(strategy=LoomStrategy(recipe="my-recipe.yaml"))      # its parallel and memory sections

Both of Lightning's packages are served: `LoomStrategy` is made on `pytorch_lightning`'s classes,
`LightningLoomStrategy` on the unified `lightning` package's (`lightning.pytorch`), and the names
"loom", "loom_spawn" and "loom_fork" are registered with each package that is installed.

`LoomStrategy` takes the keys of a recipe's `parallel` and `memory` sections (as keyword arguments,
as `parallel={...}` / `memory={...}`, or from a recipe file), checked by the same schema as the apps'
recipes. It launches and joins processes as Lightning's ddp does (Lightning's launchers, or
torchrun), then hands the LightningModule and its optimizer to the Booster plugin the keys select:
DDP, or the chunked engine (ZeRO 1-3, host / NVMe offload within a device budget), with Loom's
mixed precision and loss scaler (`Trainer(precision="bf16-mixed")` or `"16-mixed"`). Backward, the
optimizer step and clipping (`gradient_clip_val`, by norm, over the whole model wherever its
gradients live) run through the plugin; accumulation (`accumulate_grad_batches`) is Lightning's,
with the gradient synchronisation of all but the last micro-batch skipped where the plugin can.

Checkpoints (`trainer.save_checkpoint`, `ModelCheckpoint`, `fit(ckpt_path=...)`) are Loom
checkpoint folders: the unsplit weights (`model.safetensors`), the optimizer states, the loss
scaler, and Lightning's own state (loops, callbacks, schedulers: `lightning.pt`). `load_weights`
puts the weights into a plain LightningModule, and `to_lightning_checkpoint` writes the single file
`LightningModule.load_from_checkpoint` reads.

`LoomStrategy(tp=2)` splits the transformers causal LMs inside the module (Llama, OPT) with 1D
tensor parallelism by their `core.hf` plans, under their own forward (`core.hf.inplace`): the
data then splits over the data-parallel ranks only.

What Lightning allows and Loom does not do is refused at setup: manual optimization, several
optimizers, clipping by value, sync_batchnorm, and pipeline or sequence parallelism (they need a
model written for them: Loom's GPT, or apps.gpt's `model.hf`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any, ContextManager

import torch

from core.booster import Booster, make_plugin
from core.config import ConfigError, Recipe, load_recipe
from core.distributed import ParallelMesh, resolve_layout
from core.errors import LoomError
from core.layout import check_combination

LIGHTNING_STATE = "lightning.pt"          # Lightning's part of a checkpoint folder

# Lightning's precision flags and Loom's precisions
_PRECISIONS = {"32-true": "fp32", "32": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}


def settings(recipe: str | Path | None = None, parallel: dict | None = None, memory: dict | None = None,
             **keys: Any) -> Recipe:
    """The recipe a strategy runs: the recipe file's sections (if any), then `parallel` and `memory`,
    then `keys` (each a key of either section), checked as the apps' recipes are checked."""
    parallel, memory = dict(parallel or {}), dict(memory or {})
    defaults = Recipe()
    names = {"parallel": {f.name for f in dataclasses.fields(defaults.parallel)},
             "memory": {f.name for f in dataclasses.fields(defaults.memory)}}
    for key, value in keys.items():
        section = next((s for s, known in names.items() if key in known), None)
        if section is None:
            raise ConfigError(f"LoomStrategy({key}=...): not a key of a recipe's parallel or memory section; "
                              f"those are {', '.join(sorted(names['parallel'] | names['memory']))}")
        (parallel if section == "parallel" else memory)[key] = value
    overrides = [f"parallel.{k}={_yaml(v)}" for k, v in parallel.items()] + \
                [f"memory.{k}={_yaml(v)}" for k, v in memory.items()]
    return load_recipe(Recipe, recipe, overrides, source="in LoomStrategy(...)")


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _define(namespace: str) -> tuple[type, type]:
    """The precision plugin and the strategy, made on the Lightning classes of `namespace`
    (`pytorch_lightning`, or the unified package's `lightning.pytorch`: two class hierarchies that
    Lightning's Trainer tells apart with isinstance), and registered in its strategy registry."""
    LightningPrecision = importlib.import_module(f"{namespace}.plugins.precision").Precision
    strategies = importlib.import_module(f"{namespace}.strategies")
    DDPStrategy, StrategyRegistry = strategies.DDPStrategy, strategies.StrategyRegistry
    _init_optimizers_and_lr_schedulers = importlib.import_module(
        f"{namespace}.core.optimizer")._init_optimizers_and_lr_schedulers
    TrainerFn = importlib.import_module(f"{namespace}.trainer.states").TrainerFn

    class LoomPrecision(LightningPrecision):
        """Lightning's precision flag, carried out by Loom: the plugin's model wrapper runs the forward
        under its autocast and its optimizer wrapper scales the loss, so this does neither; clipping is
        the strategy's, over the whole model."""

        def __init__(self, precision: str = "32-true") -> None:
            if str(precision) not in _PRECISIONS:
                raise LoomError(f"Trainer(precision={precision!r}) with strategy=loom: choose one of "
                                f"{', '.join(repr(p) for p in _PRECISIONS)} (Loom keeps fp32 master weights)")
            self.precision = str(precision)

        def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=None) -> None:
            """Nothing: `LoomStrategy.optimizer_step` clips through the plugin."""


    class LoomStrategy(DDPStrategy):
        """Lightning's ddp launching and process group, Loom's plugins for everything the model and its
        optimizer do. See the module's documentation."""

        strategy_name = "loom"

        def __init__(self, recipe: str | Path | None = None, parallel: dict | None = None, memory: dict | None = None,
                     start_method: str = "popen", **keys: Any) -> None:
            super().__init__(start_method=start_method)
            self.settings = settings(recipe, parallel, memory, **keys)
            p = self.settings.parallel
            split = [f"parallel.{a}={getattr(p, a)}" for a in ("pp", "sp") if getattr(p, a) > 1]
            if split or p.auto:
                what = ", ".join(split) or "parallel.auto=true"
                raise LoomError(f"{what}: the Lightning strategy spreads a LightningModule with data parallelism, "
                                f"ZeRO, offload and 1D tensor parallelism of the transformers models inside it; "
                                f"pipeline and sequence parallelism need a model written for them (Loom's GPT, or "
                                f"apps.gpt's model.hf)")
            if p.tp > 1 and p.tp_mode != "1d":
                raise LoomError(f"parallel.tp_mode={p.tp_mode}: the Lightning strategy splits the transformers models "
                                f"inside a LightningModule with 1D tensor parallelism only; set parallel.tp_mode=1d")
            self._plugin = None
            self._optimizer = None                 # Loom's optimizer wrapper (the plugin's)
            self._mesh = None

        # ------------------------------------------------------------------ what Lightning asks of it

        @property
        def restore_checkpoint_after_setup(self) -> bool:
            return True                            # the plugin must hold the model before a checkpoint loads into it

        @property
        def lightning_restore_optimizer(self) -> bool:
            return False                           # `load_checkpoint` restores Loom's optimizer states itself

        @property
        def precision_plugin(self) -> LightningPrecision:
            return self._precision_plugin if self._precision_plugin is not None else LoomPrecision()

        @precision_plugin.setter
        def precision_plugin(self, plugin: LightningPrecision | None) -> None:
            # whatever Lightning made of Trainer(precision=...), Loom carries it out
            self._precision_plugin = None if plugin is None else (
                plugin if isinstance(plugin, LoomPrecision) else LoomPrecision(plugin.precision))

        def connect(self, model) -> None:
            if not model.automatic_optimization:
                raise LoomError(f"{type(model).__name__} sets automatic_optimization=False: strategy=loom steps the "
                                f"optimizer itself (its states may live in chunks on the host or on disk), so manual "
                                f"optimization is not supported; use automatic optimization or another strategy")
            super().connect(model)

        def setup_optimizers(self, trainer) -> None:
            """Nothing here: `setup` makes the optimizer and hands it to the plugin."""

        def setup(self, trainer) -> None:
            self.accelerator.setup(trainer)
            module = self.lightning_module
            if trainer.state.fn != TrainerFn.FITTING:      # validate / test / predict: the module as it is
                self.model = module.to(self.root_device)
                return
            if self._layer_sync is not None:
                raise LoomError("Trainer(sync_batchnorm=True) is not supported by strategy=loom; leave it off, or use "
                                "Lightning's ddp strategy")
            cfg = self._recipe(trainer)
            layout = resolve_layout(cfg.parallel.dp, 1, cfg.parallel.tp, 1, self.world_size)
            check_combination(cfg, layout)
            mesh = self._mesh = ParallelMesh.build(layout, self.root_device)
            if layout.tp > 1:              # the transformers models inside the module, split by their plans
                from core.hf.inplace import spread_inplace
                from core.tensor import make_mode

                spread = spread_inplace(module, make_mode("1d", mesh))
                if self.global_rank == 0:
                    print(f"strategy=loom: tensor parallelism (1d over {layout.tp} ranks) in {', '.join(spread)}",
                          file=sys.stderr)
            optimizers, self.lr_scheduler_configs = _init_optimizers_and_lr_schedulers(module)
            if len(optimizers) != 1:
                raise LoomError(f"{type(module).__name__}.configure_optimizers returns {len(optimizers)} "
                                f"optimizers; strategy=loom steps one (several need manual optimization, which it "
                                f"does not support)")
            algorithm = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm)
            if trainer.gradient_clip_val and algorithm not in (None, "norm"):
                raise LoomError(f"gradient_clip_algorithm={algorithm!r}: strategy=loom clips by "
                                f"the norm of the whole model's gradient; use gradient_clip_algorithm='norm'")
            self._plugin = make_plugin(cfg, mesh)
            self.model, self._optimizer = self._plugin.configure(module, optimizers[0])
            self.optimizers = optimizers           # the user's optimizer: Lightning's schedulers and hooks hold it
            if self.global_rank == 0:
                print(f"strategy=loom: {self._plugin.describe()}", file=sys.stderr)

        def _recipe(self, trainer) -> Recipe:
            """The strategy's recipe with the Trainer's precision and, for NVMe scratch files, its folder."""
            cfg = self.settings
            wanted = _PRECISIONS[self.precision_plugin.precision]
            asked = cfg.parallel.precision
            if asked != "fp32" and asked != wanted:
                raise LoomError(f"LoomStrategy(precision={asked!r}) and Trainer(precision="
                                f"{self.precision_plugin.precision!r}) disagree; set the precision on the Trainer only")
            nvme = cfg.memory.nvme_dir or str(Path(trainer.default_root_dir) / "loom-nvme")
            return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, precision=wanted),
                                       memory=dataclasses.replace(cfg.memory, nvme_dir=nvme),
                                       output=dataclasses.replace(cfg.output, dir=str(trainer.default_root_dir)))

        @property
        def distributed_sampler_kwargs(self) -> dict:
            """The ranks of a tensor-parallel group see the same samples: the data splits over dp only."""
            if self._mesh is None:
                return super().distributed_sampler_kwargs
            dp = self._mesh.axis("dp")
            return {"num_replicas": dp.size, "rank": dp.rank}

        def model_to_device(self) -> None:
            """Nothing: the plugin places the weights (on the device, the host or disk)."""

        def block_backward_sync(self) -> ContextManager:
            """Lightning's accumulation micro-batches: the plugin's no_sync (DDP skips its all-reduce; the
            chunked engine accumulates gradient shards as it goes)."""
            if self._plugin is None:
                return contextlib.nullcontext()
            return self._plugin.no_sync(self.model)

        def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
            module = self.lightning_module
            self.pre_backward(closure_loss)
            closure_loss = self.precision_plugin.pre_backward(closure_loss, module)     # on_before_backward
            self._optimizer.backward(closure_loss)                                     # scaled under fp16
            closure_loss = self.precision_plugin.post_backward(closure_loss, module)    # on_after_backward
            self.post_backward(closure_loss)
            return closure_loss

        def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
            """Lightning's closure (training_step and backward), the hooks before a step, then Loom's
            clipping and step; under fp16 an overflow skips the step and lowers the scale."""
            loss = closure()
            self.precision_plugin._after_closure(model or self.lightning_module, optimizer)
            clip = self.lightning_module.trainer.gradient_clip_val
            if clip:
                self._optimizer.clip_grad_norm(float(clip))
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
            return loss

        # ------------------------------------------------------------------ checkpoints

        def lightning_module_state_dict(self) -> dict:
            return {}                    # the weights go into the checkpoint folder through the plugin

        def optimizer_state(self, optimizer) -> dict:
            return {}                    # and so do the optimizer states, wherever they live

        def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
            """A Loom checkpoint folder at `filepath` (every rank takes part; written atomically). After
            fit has ended the optimizer states are gone (the chunks are released when it ends): the folder
            then holds the weights and Lightning's state, which load but do not resume."""
            if storage_options is not None:
                raise LoomError("trainer.save_checkpoint(storage_options=...) is not supported by strategy=loom")
            folder = Path(self.broadcast(str(filepath)))
            lightning = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
            lightning["loom_resumable"] = self._plugin is not None

            def add_files(tmp: Path) -> None:
                torch.save(lightning, tmp / LIGHTNING_STATE)

            if self._plugin is not None:
                Booster(self._plugin).save(folder, self.model, self._optimizer, add_files=add_files,
                                           meta={"lightning": True})
                return
            from core.checkpoint import CheckpointIO
            from core.checkpoint.atomic import write_atomically

            def write(tmp: Path) -> None:
                if self.global_rank == 0:
                    CheckpointIO().save_model(self.lightning_module, tmp, 0)
                    add_files(tmp)
            mesh = ParallelMesh.build(resolve_layout(0, 1, 1, 1, self.world_size), self.root_device)
            write_atomically(folder, write, mesh.world)

        def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
            """Restore a checkpoint folder into the plugin's model and optimizer; returns Lightning's state."""
            folder = Path(checkpoint_path)
            if not (folder / LIGHTNING_STATE).is_file():
                raise LoomError(f"ckpt_path={checkpoint_path}: not a checkpoint of strategy=loom (no "
                                f"{LIGHTNING_STATE}); a file from another strategy loads with "
                                f"LightningModule.load_from_checkpoint")
            # Lightning's own state (loops, callbacks, hyperparameters): pickled objects, as in its .ckpt files
            state = torch.load(folder / LIGHTNING_STATE, map_location="cpu", weights_only=False)
            if not state.get("loom_resumable", True):
                raise LoomError(f"ckpt_path={checkpoint_path} was saved after fit had ended, when the optimizer "
                                f"states were already released: it holds the weights (load_weights, "
                                f"to_lightning_checkpoint) but cannot resume; resume from one saved during training "
                                f"(ModelCheckpoint)")
            Booster(self._plugin).load(folder, self.model, self._optimizer)
            return state

        def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
            """Nothing: `load_checkpoint` loaded the weights."""

        def load_optimizer_state_dict(self, checkpoint) -> None:
            """Nothing: `load_checkpoint` loaded the optimizer states."""

        def teardown(self) -> None:
            if self._plugin is not None:
                if self._optimizer is not None:                  # configured (a refused setup never was)
                    report = self._plugin.report()
                    if report and self.global_rank == 0:
                        print(report, file=sys.stderr)           # what the chunked engine moved
                    self._plugin.unchunk(self.lightning_module)  # ordinary parameters again, from the master weights
                self._plugin.close()
                self._plugin = self._optimizer = self._mesh = None
            self.model = self.lightning_module
            super().teardown()

    for name, start in (("loom", "popen"), ("loom_spawn", "spawn"), ("loom_fork", "fork")):
        StrategyRegistry.register(name, LoomStrategy, description=f"Loom's plugins, processes started by {start}",
                                  override=True, start_method=start)
    return LoomPrecision, LoomStrategy


def load_weights(module: torch.nn.Module, checkpoint: str | Path) -> torch.nn.Module:
    """Put a strategy=loom checkpoint's weights into `module` (a plain LightningModule, one process)."""
    from core.checkpoint import CheckpointIO

    CheckpointIO().load_model(module, Path(checkpoint))
    return module


def to_lightning_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the single-file checkpoint `LightningModule.load_from_checkpoint` reads (Lightning's
    state and the unsplit weights; the optimizer states stay in the folder)."""
    from core.checkpoint import read_weights

    folder = Path(checkpoint)
    state = torch.load(folder / LIGHTNING_STATE, map_location="cpu", weights_only=False)
    state["state_dict"] = dict(read_weights(folder / "model.safetensors"))
    out = Path(out)
    torch.save(state, out)
    return out


def _installed() -> list[str]:
    found = []
    for namespace in ("pytorch_lightning", "lightning.pytorch"):
        try:
            importlib.import_module(namespace)
        except ImportError:
            continue
        found.append(namespace)
    if not found:       # the extra is optional; nothing else in Loom imports this module
        raise ImportError("core.integrations.lightning needs PyTorch Lightning 2.x: pip install "
                          "'loom-train[lightning]' (pytorch-lightning>=2.4,<3), or the unified lightning package")
    return found


# One strategy per installed Lightning: `LoomStrategy` on pytorch_lightning (when installed, else on
# lightning.pytorch), `LightningLoomStrategy` on lightning.pytorch. Each is named here as its class
# is named, so that a spawned rank unpickles it.
STRATEGIES: dict[str, type] = {}
for _namespace in _installed():
    _precision, _strategy = _define(_namespace)
    _prefix = "Lightning" if _namespace == "lightning.pytorch" else ""
    for _cls, _name in ((_precision, f"{_prefix}LoomPrecision"), (_strategy, f"{_prefix}LoomStrategy")):
        _cls.__qualname__ = _cls.__name__ = _name
        globals()[_name] = _cls
    STRATEGIES[_namespace] = _strategy
if "LoomStrategy" not in globals():
    LoomStrategy, LoomPrecision = globals()["LightningLoomStrategy"], globals()["LightningLoomPrecision"]

"""What a plugin tells the checkpoint format: how its ranks hold the model's weights.

The format (`core.checkpoint.io`) writes and reads whole, unsplit weights. A `Sharding` turns
this rank's view of the model into unsplit tensors by name (`gather`, a collective) and puts
unsplit tensors back where this rank keeps them (`scatter`), and names the mesh axes whose
ranks hold different optimizer states (`split_by`).

The base class is the common case: every rank holds the model in its own parameters, the layers
of `core.tensor` split over their tensor-parallel group. A plugin that keeps its parameters
elsewhere (in chunks) overrides `local` and `load_local`; one whose ranks hold different parts
of the model (pipeline stages) overrides `gather`.
"""

from __future__ import annotations

import torch
from torch import nn

from core.checkpoint.sharded import Held, ShardReader, ShardWriter
from core.checkpoint.weights import Ties, check_shape, merge_ties, persistent_buffers, tied_names
from core.errors import LoomError
from core.tensor import TPLayer

# what the sharded format calls the chunk optimizer's states (`core.zero.states.KINDS`)
CHUNK_KEYS = {"master": "model", "exp_avg": "optim:exp_avg", "exp_avg_sq": "optim:exp_avg_sq"}


def split_layer(model: nn.Module, name: str) -> tuple[TPLayer, str] | None:
    """The tensor-parallel layer that splits parameter `name`, and the parameter's name in it."""
    module_name, _, pname = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, TPLayer) and pname in module.tp_kinds:
        return module, pname
    return None


def unsplit(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of this rank's parameters by name, at their unsplit shapes: the parts of
    `core.tensor` layers gathered over their tensor-parallel group (a collective: the ranks of
    the group pass the same names in the same order), the others as they are. Each comes back on
    the device it was given on."""
    out = {}
    for name, t in tensors.items():
        split = split_layer(model, name)
        if split is not None and split[0].mode.size > 1:
            layer, pname = split
            device = getattr(layer, pname).device         # where the group communicates
            t = layer.mode.gather(layer.tp_kinds[pname], t.to(device), layer.serial_shapes[pname]).to(t.device)
        out[name] = t
    return out


class SplitDraw:
    """`materialize(name, out)` for a model made on the meta device, from its `init(name, tensor)`:
    a parameter that a tensor-parallel layer splits is drawn whole (the same numbers one process
    draws) and this rank keeps its part, as the layers do when built normally. `as_name` draws
    the values of another name (a tied weight's copy on another pipeline stage, which holds the
    first one's values), still split as `name` is."""

    def __init__(self, model: nn.Module, init) -> None:
        self.model, self.init = model, init

    def __call__(self, name: str, out: torch.Tensor, as_name: str | None = None) -> None:
        draw = as_name or name
        split = split_layer(self.model, name)
        if split is None or split[0].mode.size == 1:
            self.init(draw, out)
            return
        layer, pname = split
        whole = torch.empty(layer.serial_shapes[pname], dtype=out.dtype, device=out.device)
        self.init(draw, whole)
        out.copy_(layer.shard(pname, whole))


def make_meta_parameters(model: nn.Module, draw, device: torch.device | str = "cpu") -> None:
    """Give each of `model`'s parameters that is on the meta device values of its own on `device`,
    from `draw(name, tensor)`, in place: the parameter object stays (the optimizer and every module
    that shares it, a tied weight, keep it), with what the layers noted on it (tp_replicas)."""
    for name, param in model.named_parameters():
        if not param.is_meta:
            continue
        values = torch.empty(param.shape, dtype=param.dtype, device=device)
        with torch.no_grad():
            draw(name, values)
        made = nn.Parameter(values, requires_grad=param.requires_grad)
        made.__dict__.update(param.__dict__)
        torch.utils.swap_tensors(param, made)


def split(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's part of each of its parameters (by its first name) from unsplit `weights`."""
    out = {}
    for name, p in model.named_parameters():
        value, split = weights[name], split_layer(model, name)
        if split is None:
            check_shape(name, value, p.shape)
            out[name] = value
        else:
            layer, pname = split
            check_shape(name, value, layer.serial_shapes[pname])
            out[name] = layer.shard(pname, value)
    return out


class Sharding:
    """Every rank holds the model in its own parameters; under tensor parallelism (a mesh whose
    tp axis has several ranks) each holds its part, and its optimizer state differs per tp rank."""

    whole = True           # this rank's model has every name of the whole model

    def __init__(self, mesh=None) -> None:
        self.mesh = mesh

    @property
    def split_by(self) -> tuple[str, ...]:
        """The mesh axes whose ranks hold different optimizer states."""
        return ("tp",) if self.mesh is not None and self.mesh.size("tp") > 1 else ()

    def ties(self, model: nn.Module) -> Ties:
        """The names of each tensor of the model held under several."""
        return tied_names(model)

    def local(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """This rank's parameters by name, as it holds them."""
        return {n: p.detach() for n, p in model.named_parameters()}

    @torch.no_grad()
    def load_local(self, model: nn.Module, local: dict[str, torch.Tensor]) -> None:
        """Set this rank's parameters from `local` (by name, shaped as this rank holds them)."""
        for name, p in model.named_parameters():
            p.copy_(local[name])

    def gather(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's parameters, unsplit, and its persistent buffers, by name (any one name of a
        tied tensor). A collective: every rank calls it, and rank 0 of the world gets them all."""
        return {**unsplit(model, self.local(model)), **persistent_buffers(model)}

    def scatter(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Take this rank's part of every parameter from unsplit `weights` (which hold every name
        of this rank's parameters)."""
        self.load_local(model, split(model, weights))

    # ------------------------------------------------------------ the sharded format

    def chunk_states(self):
        """The chunk optimizer's states (`core.zero.states.ChunkStates`) when the weights live in
        chunks, else None."""
        return None

    def held(self, model: nn.Module, name: str, local: torch.Tensor) -> Held:
        """Which part of the model's tensor `name` this rank holds as `local`."""
        split = split_layer(model, name)
        if split is None or split[0].mode.size == 1:
            return Held.whole(local.shape)
        layer, pname = split
        shape = layer.serial_shapes[pname]
        return Held.from_index(shape, layer.mode.param_index(layer.tp_kinds[pname], shape, layer.mode.rank))

    def _writes_replica(self) -> bool:
        """Ranks that hold the same parameters (dp, sp): the first one writes them."""
        mesh = self.mesh
        return mesh is None or (mesh.rank("dp") == 0 and mesh.rank("sp") == 0)

    def _tp_copy(self, held: Held) -> bool:
        """A tensor every tp rank holds whole (a norm's scale, a row layer's bias): tp rank 0's
        copy is written, the others' would be the same bytes again."""
        mesh = self.mesh
        return mesh is not None and mesh.rank("tp") > 0 and held.runs == Held.whole(held.shape).runs

    def stored_names(self, model: nn.Module) -> dict[str, str]:
        """Each name of a tied tensor -> the one name it is stored under (the first, sorted)."""
        return {n: group[0] for group in merge_ties(self.ties(model)) for n in group}

    def save_shards(self, model: nn.Module, optimizer, writer: ShardWriter) -> dict:
        """Add the pieces this rank owns (weights, optimizer states, buffers) to `writer`; returns
        what every rank holds alike (the optimizer's step count and hyperparameter groups)."""
        stored = self.stored_names(model)
        states = self.chunk_states()
        if states is not None:
            shared = self._save_chunks(model, states, writer, stored)
        else:
            shared = self._save_params(model, optimizer, writer, stored)
        mesh = self.mesh
        if self._writes_replica() and (mesh is None or mesh.rank("tp") == 0):
            for name, buf in persistent_buffers(model).items():
                writer.add(f"buffer:{stored.get(name, name)}", buf)
        return shared

    def _save_params(self, model, optimizer, writer, stored) -> dict:
        step = 0
        for name, p in model.named_parameters():
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            step = max(step, int(state["step"])) if "step" in state else step
            if not self._writes_replica():
                continue
            key, held = stored.get(name, name), self.held(model, name, p)
            if self._tp_copy(held):
                continue
            writer.add(f"model:{key}", p, held)
            for kind, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and kind != "step":
                    writer.add(f"optim:{kind}:{key}", value, held)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] if optimizer else []
        return {"step": step, "groups": groups}

    def _save_chunks(self, model, states, writer, stored) -> dict:
        from core.zero.states import KINDS

        m = states.manager
        for chunk in m.chunks:
            if not chunk.trained:      # frozen: weights alone, whole on every rank for a moment
                whole = states.whole("master", chunk)
                if m.rank == 0:
                    for info in chunk.tensors:
                        held = self.held(model, info.name, info.param)
                        if not self._tp_copy(held):
                            writer.add(f"model:{stored.get(info.name, info.name)}",
                                       whole[info.offset:info.offset + info.numel].view(info.param.shape), held)
                continue
            shard = chunk.shard(m.rank)
            values = {kind: states.get(kind, chunk) for kind in KINDS}
            for info in chunk.tensors:
                a, b = max(info.offset, shard.start), min(info.offset + info.numel, shard.stop)
                if a >= b:
                    continue
                held, key = self.held(model, info.name, info.param), stored.get(info.name, info.name)
                if self._tp_copy(held):
                    continue
                for kind in (KINDS if info.param.requires_grad else ("master",)):
                    writer.add(f"{CHUNK_KEYS[kind]}:{key}", values[kind][a - shard.start:b - shard.start], held,
                               (a - info.offset, b - info.offset))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in states.param_groups]
        return {"step": states.step_count, "skipped": states.skipped_steps, "scaler": states.scaler.state_dict(),
                "groups": groups}

    @torch.no_grad()
    def load_shards(self, model: nn.Module, optimizer, reader: ShardReader, shared: dict | None) -> None:
        """Set this rank's weights, buffers and (with `optimizer`) optimizer states from a sharded
        checkpoint written in any layout. `shared` is what `save_shards` returned (None: weights only)."""
        stored = self.stored_names(model)
        states = self.chunk_states()
        try:
            if states is not None:
                self._load_chunks(model, states, reader, stored, shared if optimizer is not None else None)
            else:
                self._load_params(model, optimizer, reader, stored, shared)
            for name, buf in persistent_buffers(model).items():
                buf.copy_(reader.read(reader.tied(f"buffer:{stored.get(name, name)}")))
        except RuntimeError as e:
            raise LoomError(f"the sharded checkpoint {reader.folder} does not fit this model: "
                            f"{str(e).splitlines()[0]}") from None

    def _load_params(self, model, optimizer, reader, stored, shared) -> None:
        kinds = sorted({n.split(":")[1] for n in reader.names() if n.startswith("optim:")})
        for name, p in model.named_parameters():
            key, held = stored.get(name, name), self.held(model, name, p)
            key = reader.tied(f"model:{key}").partition(":")[2]
            p.copy_(reader.read(f"model:{key}", held))
            if optimizer is None or shared is None or not p.requires_grad:
                continue
            state = {kind: reader.read(f"optim:{kind}:{key}", held).to(p.device)
                     for kind in kinds if f"optim:{kind}:{key}" in reader}
            if state:
                state["step"] = torch.tensor(float(shared["step"]))
                optimizer.state[p] = state
        if optimizer is not None and shared is not None:
            _load_groups(optimizer.param_groups, shared["groups"])

    def _load_chunks(self, model, states, reader, stored, shared) -> None:
        from core.zero.states import KINDS

        m = states.manager
        for chunk in m.chunks:
            if not chunk.trained:
                whole = torch.zeros(chunk.capacity, dtype=torch.float32)
                for info in chunk.tensors:
                    whole[info.offset:info.offset + info.numel] = reader.read(
                        reader.tied(f"model:{stored.get(info.name, info.name)}"),
                        self.held(model, info.name, info.param)).reshape(-1)
                m.set_weights(chunk, whole)
                continue
            shard = chunk.shard(m.rank)
            for kind in (KINDS if shared is not None else ("master",)):
                buf = torch.zeros(chunk.shard_numel, dtype=torch.float32)
                for info in chunk.tensors:
                    a, b = max(info.offset, shard.start), min(info.offset + info.numel, shard.stop)
                    name = reader.tied(f"{CHUNK_KEYS[kind]}:{stored.get(info.name, info.name)}")
                    if a >= b or (kind != "master" and (not info.param.requires_grad or name not in reader)):
                        continue
                    buf[a - shard.start:b - shard.start] = reader.read(
                        name, self.held(model, info.name, info.param), (a - info.offset, b - info.offset))
                states.store.write(kind, chunk.index, buf)
                if kind == "master":
                    m.update_working(chunk, buf)
        if shared is not None:
            states.step_count = int(shared["step"])
            states.skipped_steps = int(shared.get("skipped", 0))
            if shared.get("scaler") is not None:
                states.scaler.load_state_dict(shared["scaler"])
            _load_groups(states.param_groups, shared["groups"])


def _load_groups(groups: list[dict], saved: list[dict]) -> None:
    if len(saved) != len(groups):
        raise LoomError(f"the checkpoint's optimizer has {len(saved)} parameter groups, this one {len(groups)}")
    for group, values in zip(groups, saved):
        group.update(values)

"""`ParallelMesh`: the processes of a run arranged on named axes `pp`, `dp`, `sp`, `tp`.

(An app whose parallelism is none of these names its own axis over every process instead:
`ParallelMesh.one_axis("axial")` for the protein app's axial parallelism.)

The axes are ordered outermost to innermost, so the ranks of one tensor-parallel group are
neighbours (on one node, where the links are fastest), then sequence, then data, and pipeline
stages are furthest apart. The mesh is built on `torch.distributed.device_mesh`; every axis
is exposed as an `AxisGroup` whose collectives report to the mesh's one `CommStats`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.distributed.comm import AxisGroup, CommStats
from core.errors import LoomError

AXES = ("pp", "dp", "sp", "tp")


@dataclass(frozen=True)
class Layout:
    """How many processes along each axis."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    sp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp * self.sp

    def size(self, axis: str) -> int:
        return getattr(self, axis)

    def describe(self) -> str:
        parts = [f"{a}={self.size(a)}" for a in ("pp", "tp", "sp") if self.size(a) > 1]
        return " ".join([f"dp={self.dp}"] + parts)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def fitting_layouts(world_size: int, wanted: Layout, limit: int = 5) -> list[Layout]:
    """Layouts whose product is `world_size`, the ones closest to `wanted` first."""
    fits = []
    for pp, tp, sp in itertools.product(_divisors(world_size), repeat=3):
        if world_size % (pp * tp * sp) == 0:
            fits.append(Layout(dp=world_size // (pp * tp * sp), pp=pp, tp=tp, sp=sp))

    def distance(layout: Layout) -> tuple[int, int]:
        model_axes = sum(layout.size(a) != wanted.size(a) for a in ("pp", "tp", "sp"))
        return model_axes, int(layout.dp != wanted.dp)

    return sorted(fits, key=distance)[:limit]


def resolve_layout(dp: int, pp: int, tp: int, sp: int, world_size: int) -> Layout:
    """The layout for this world size; `dp=0` takes whatever tp x pp x sp leaves.

    A layout that does not multiply out to the world size fails with the layouts that would.
    """
    model = pp * tp * sp
    wanted = Layout(dp=dp or 1, pp=pp, tp=tp, sp=sp)
    if dp == 0 and world_size % model == 0:
        return Layout(dp=world_size // model, pp=pp, tp=tp, sp=sp)
    if dp != 0 and dp * model == world_size:
        return wanted
    fits = " | ".join(layout.describe() for layout in fitting_layouts(world_size, wanted))
    if dp == 0:
        problem = (f"parallel.tp={tp} x parallel.pp={pp} x parallel.sp={sp} = {model} does not "
                   f"divide the world size {world_size}")
    else:
        problem = (f"parallel layout dp={dp} x pp={pp} x tp={tp} x sp={sp} needs {dp * model} "
                   f"processes but the world size is {world_size}")
    plural = "es" if world_size > 1 else ""
    raise LoomError(f"{problem}; layouts that fit {world_size} process{plural}: {fits} "
                    f"(set them as parallel.<axis>=N, or change the number of processes)")


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


class ParallelMesh:
    """Named process axes with counted collectives.

    `mesh.axis("tp")` is this rank's tensor-parallel `AxisGroup`; `mesh.stats` counts what
    every collective on every axis sent.
    """

    def __init__(self, layout: Layout, device: torch.device, axes: dict[str, AxisGroup],
                 stats: CommStats, global_rank: int = 0, device_mesh=None) -> None:
        self.layout = layout
        self.device = device
        self.stats = stats
        self.global_rank = global_rank
        self.device_mesh = device_mesh
        self._axes = axes
        self._sub_axes: dict[tuple, dict[str, AxisGroup]] = {}

    @classmethod
    def build(cls, layout: Layout, device: torch.device | str = "cpu") -> "ParallelMesh":
        """Arrange the running processes as `layout`. One process needs no process group."""
        device = torch.device(device)
        stats = CommStats()
        if layout.world_size == 1 and not dist.is_initialized():
            axes = {a: AxisGroup(a, 1, 0, (0,), None, stats, device) for a in AXES + ("world",)}
            return cls(layout, device, axes, stats)
        if not dist.is_initialized():
            raise LoomError(f"layout {layout.describe()} needs {layout.world_size} processes; "
                            f"start them with torchrun --nproc-per-node {layout.world_size}")
        world = dist.get_world_size()
        if world != layout.world_size:
            resolve_layout(layout.dp, layout.pp, layout.tp, layout.sp, world)  # raises with the fits
        from torch.distributed.device_mesh import init_device_mesh

        shape = tuple(layout.size(a) for a in AXES)
        dm = init_device_mesh(device.type, shape, mesh_dim_names=AXES)
        coord = dm.get_coordinate()
        grid = dm.mesh
        axes = {}
        for i, a in enumerate(AXES):
            index = list(coord)
            index[i] = slice(None)
            ranks = tuple(int(r) for r in grid[tuple(index)].tolist())
            axes[a] = AxisGroup(a, layout.size(a), coord[i], ranks, dm.get_group(a), stats, device)
        axes["world"] = AxisGroup("world", world, dist.get_rank(), tuple(range(world)), None, stats,
                                  device)
        return cls(layout, device, axes, stats, global_rank=dist.get_rank(), device_mesh=dm)

    @classmethod
    def one_axis(cls, name: str, device: torch.device | str = "cpu") -> "ParallelMesh":
        """Every process of the run on one axis called `name`, for an app whose processes split
        its work in a way none of the training axes describes (the protein app splits the
        Evoformer's rows over `axial`); the training axes have size 1. Its collectives are
        counted under `name`."""
        device = torch.device(device)
        stats = CommStats()
        alone = not dist.is_initialized()
        world, rank = (1, 0) if alone else (dist.get_world_size(), dist.get_rank())
        axes = {a: AxisGroup(a, 1, 0, (rank,), None, stats, device) for a in AXES}
        for axis in (name, "world"):                      # group None: the default group, every process
            axes[axis] = AxisGroup(axis, world, rank, tuple(range(world)), None, stats, device)
        return cls(Layout(), device, axes, stats, global_rank=rank)

    def axis(self, name: str) -> AxisGroup:
        """One of `pp`, `dp`, `sp`, `tp` (or an app's own, see `one_axis`), or `world` (every
        process of the run)."""
        try:
            return self._axes[name]
        except KeyError:
            raise KeyError(f"no mesh axis {name!r}; axes are {', '.join(self._axes)}") from None

    def _instances(self, names: tuple[str, ...]) -> list[list[int]]:
        """The global ranks of every group spanned by the axes `names` (the other axes fixed),
        each in row-major order over `names` in mesh order."""
        order = [AXES.index(a) for a in AXES if a not in names] + [AXES.index(a) for a in AXES if a in names]
        size = _prod(self.size(a) for a in names)
        return self.device_mesh.mesh.permute(*order).reshape(-1, size).tolist()

    def _make_groups(self, groups: list[list[int]], name: str) -> AxisGroup | None:
        """One process group per list of global ranks (collective: every process creates every
        group, in the same order); this rank's as an AxisGroup called `name`, or None."""
        mine = None
        for members in groups:
            members = [int(r) for r in members]
            group = dist.new_group(members)
            if self.global_rank in members:
                mine = AxisGroup(name, len(members), members.index(self.global_rank), tuple(members), group,
                                 self.stats, self.device)
        return mine

    def _single(self, name: str) -> AxisGroup:
        return AxisGroup(name, 1, 0, (self.global_rank,), None, self.stats, self.device)

    def split_axis(self, name: str, shape: tuple[int, ...],
                   subgroups: dict[str, tuple[int, ...]]) -> dict[str, AxisGroup]:
        """Regard axis `name` as a grid of `shape` (its ranks in row-major order) and return one
        `AxisGroup` per entry of `subgroups`, which lists the grid dimensions that vary inside that
        group (ranks ordered row-major over them). The groups are named `<name>.<key>`, so the
        stats of `name` include them. Every process of the run must call this with the same
        arguments (process groups are created collectively); repeated calls reuse the groups."""
        axis = self.axis(name)
        if axis.size != _prod(shape):
            raise ValueError(f"axis '{name}' has {axis.size} ranks, not a grid of {shape}")
        key = (name, tuple(shape), tuple(sorted(subgroups.items())))
        if key not in self._sub_axes:
            out: dict[str, AxisGroup] = {}
            for sub, varying in subgroups.items():
                if self.device_mesh is None:          # one process
                    out[sub] = self._single(f"{name}.{sub}")
                    continue
                # move the varying grid dimensions last: each row is then one group
                fixed = [d for d in range(len(shape)) if d not in varying]
                size = _prod(shape[d] for d in varying)
                rows = [torch.tensor(ranks).reshape(shape).permute(*fixed, *varying).reshape(-1, size).tolist()
                        for ranks in self._instances((name,))]
                out[sub] = self._make_groups([row for instance in rows for row in instance], f"{name}.{sub}")
            self._sub_axes[key] = out
        return self._sub_axes[key]

    def joint(self, names: tuple[str, ...]) -> AxisGroup:
        """Several axes as one group `a+b` (for example dp x sp, whose ranks all hold the same
        weights); ranks ordered row-major over the axes in mesh order. Collective, like `split_axis`."""
        live = tuple(a for a in AXES if a in names and self.size(a) > 1)
        if len(live) <= 1:
            return self.axis(live[0] if live else names[0])
        label = "+".join(live)
        key = ("joint", label)
        if key not in self._sub_axes:
            self._sub_axes[key] = {label: self._make_groups(self._instances(live), label)}
        return self._sub_axes[key][label]

    def subgroup(self, name: str, indices: tuple[int, ...], label: str) -> AxisGroup | None:
        """The ranks at positions `indices` of axis `name` (for example the first and last
        pipeline stage) as a group `<name>.<label>`; None on a rank outside it. Every process of
        the run must call this with the same arguments."""
        key = (name, tuple(indices), label)
        if key not in self._sub_axes:
            full = f"{name}.{label}"
            group = (self._single(full) if self.device_mesh is None else
                     self._make_groups([[ranks[i] for i in indices] for ranks in self._instances((name,))], full))
            self._sub_axes[key] = {label: group}
        return self._sub_axes[key][label]

    @property
    def world(self) -> AxisGroup:
        return self._axes["world"]

    def size(self, name: str) -> int:
        return self._axes[name].size

    def rank(self, name: str) -> int:
        return self._axes[name].rank

    @property
    def world_size(self) -> int:
        return self.world.size

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

    def __repr__(self) -> str:
        coords = " ".join(f"{a}={self.rank(a)}/{self.size(a)}" for a in AXES)
        return f"ParallelMesh(rank {self.global_rank}: {coords}, device={self.device})"

"""One checkpoint format for every plugin: the weights that ddp (one process, and tp=2), zero
(stages 2 and 3 over dp=2) and pipeline (pp=2) write are the plain model's state dict, tied
weights once and persistent buffers with them, and each loads into every other plugin and into a
plain torch model; optimizer files are named by the axes whose ranks hold different states."""

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file
from torch import nn

from core.booster import DDPPlugin, PipelinePlugin, ZeroPlugin
from core.config import MemoryConfig
from core.distributed import Layout, ParallelMesh
from core.distributed.testing import run_distributed
from core.pipeline import PipelineLayer
from core.tensor import COLUMN, ROW, Embedding, LayerNorm, Linear, OneD, make_mode

V, W = 16, 8
LAYOUTS = {"ddp": Layout(), "tp2": Layout(tp=2), "zero2": Layout(dp=2), "zero3": Layout(dp=2), "pp2": Layout(pp=2)}
SEEDS = {"ddp": 1, "tp2": 2, "zero2": 3, "zero3": 4, "pp2": 5}
OPTIMIZER_FILES = {"ddp": ["optimizer.pt"], "tp2": ["optimizer.tp0.pt", "optimizer.tp1.pt"],
                   "zero2": ["optimizer.pt"], "zero3": ["optimizer.pt"],
                   "pp2": ["optimizer.pp0.tp0.pt", "optimizer.pp1.tp0.pt"]}


class Block(nn.Module):
    def __init__(self, mode) -> None:
        super().__init__()
        self.fc = Linear(W, 2 * W, mode, role=COLUMN)
        self.proj = Linear(2 * W, W, mode, role=ROW)
        self.register_buffer("gain", torch.rand(W))
        self.register_buffer("cache", torch.zeros(2), persistent=False)


class TinyLM(nn.Module):
    """An embedding tied to the classifier, two blocks split over tp, buffers; cut into stages."""

    def __init__(self, mode=None) -> None:
        super().__init__()
        mode = mode or OneD.serial()
        self.emb = Embedding(V, W, mode)
        self.blocks = nn.ModuleList(Block(mode) for _ in range(2))
        self.norm = LayerNorm(W, mode)
        self.classifier = Linear(W, V, mode, bias=False, role=COLUMN)
        self.classifier.weight = self.emb.weight

    def pipeline_layers(self) -> list:
        return ([PipelineLayer("embed", ("emb",), self.emb, body=False)]
                + [PipelineLayer(f"block{i}", (f"blocks.{i}",), b) for i, b in enumerate(self.blocks)]
                + [PipelineLayer("head", ("norm", "classifier"), self.classifier, body=False)])

    def pipeline_tied(self) -> list[tuple[str, str]]:
        return [("emb.weight", "classifier.weight")]


class PlainLM(nn.Module):
    """The same model from torch layers only."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, W)
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(W, 2 * W), "proj": nn.Linear(2 * W, W)})
                                    for _ in range(2))
        for block in self.blocks:
            block.register_buffer("gain", torch.zeros(W))
        self.norm = nn.LayerNorm(W)
        self.classifier = nn.Linear(W, V, bias=False)
        self.classifier.weight = self.emb.weight


def _reference(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return TinyLM().state_dict()


def _build(kind: str, mesh: ParallelMesh, seed: int):
    torch.manual_seed(seed)
    model = TinyLM(make_mode("1d", mesh) if mesh.size("tp") > 1 else None)   # the same values in any layout
    if kind.startswith("zero"):
        plugin = ZeroPlugin(mesh, stage=int(kind[-1]), memory=MemoryConfig(chunk_mb=0.001))  # several chunks
    else:
        plugin = PipelinePlugin(mesh) if kind == "pp2" else DDPPlugin(mesh)
    _, optimizer = plugin.configure(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    return plugin.checkpoint_io(), model, optimizer


def _save(io, model, optimizer, folder: Path, mesh: ParallelMesh) -> None:
    if mesh.global_rank == 0:
        folder.mkdir()
    torch.distributed.barrier()
    io.save_model(model, folder, mesh.global_rank)
    if optimizer is not None:
        io.save_optimizer(optimizer, folder, mesh.global_rank)
    torch.distributed.barrier()


def _two_ranks(root: str) -> None:
    root = Path(root)
    meshes = {layout: ParallelMesh.build(layout) for layout in {LAYOUTS[k] for k in LAYOUTS if k != "ddp"}}
    for kind in SEEDS:
        if kind != "ddp":
            _save(*_build(kind, meshes[LAYOUTS[kind]], SEEDS[kind]), root / kind, meshes[LAYOUTS[kind]])
    torch.distributed.barrier()
    for loader in SEEDS:
        if loader == "ddp":
            continue
        mesh = meshes[LAYOUTS[loader]]
        for writer in SEEDS:
            io, model, optimizer = _build(loader, mesh, seed=99)
            io.load_model(model, root / writer)
            if writer == loader:                               # a resume: the optimizer too
                io.load_optimizer(optimizer, root / writer)
            _save(io, model, None, root / f"{writer}-into-{loader}", mesh)


def _save_one(io, model, optimizer, folder: Path) -> None:
    folder.mkdir()
    io.save_model(model, folder, 0)
    if optimizer is not None:
        io.save_optimizer(optimizer, folder, 0)


def _assert_is_reference(path: Path, ref: dict[str, torch.Tensor]) -> None:
    saved = load_file(path)
    assert set(saved) == set(ref) - {"emb.weight"}, path     # tied: once, under the first name in sorted order
    assert all(torch.equal(saved[k], ref[k]) for k in saved), path
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"emb.weight": "classifier.weight"}, path


def test_every_plugin_loads_the_weights_every_other_wrote(tmp_path):
    one = ParallelMesh.build(Layout())
    _save_one(*_build("ddp", one, SEEDS["ddp"]), tmp_path / "ddp")
    run_distributed(_two_ranks, world_size=2, args=(str(tmp_path),))
    for writer in SEEDS:
        io, model, optimizer = _build("ddp", one, seed=99)
        io.load_model(model, tmp_path / writer)
        if writer == "ddp":
            io.load_optimizer(optimizer, tmp_path / writer)
        _save_one(io, model, None, tmp_path / f"{writer}-into-ddp")

    for writer, seed in SEEDS.items():
        ref = _reference(seed)
        assert sorted(p.name for p in (tmp_path / writer).glob("optimizer*")) == OPTIMIZER_FILES[writer]
        for loader in SEEDS:
            folder = writer if loader == writer else f"{writer}-into-{loader}"
            _assert_is_reference(tmp_path / folder / "model.safetensors", ref)
        plain = PlainLM()
        load_model(plain, str(tmp_path / writer / "model.safetensors"))  # strict: every name, nothing more
        got = plain.state_dict()
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_older_files_load_the_tied_weight_under_any_name_and_every_buffer(tmp_path):
    """Before one format, the zero plugin stored a tied weight under the name the model gives it
    first (not the first in sorted order), and the tp, zero and pipeline plugins stored
    non-persistent buffers as well."""
    ref = _reference(7)
    older = {k: v for k, v in ref.items() if k != "classifier.weight"}     # under its other name
    older.update({f"blocks.{i}.cache": torch.zeros(2) for i in range(2)})
    (tmp_path / "old").mkdir()
    save_file(older, str(tmp_path / "old" / "model.safetensors"))
    io, model, _ = _build("ddp", ParallelMesh.build(Layout()), seed=99)
    io.load_model(model, tmp_path / "old")
    got = model.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref if k in got)
    assert torch.equal(model.classifier.weight, ref["classifier.weight"])

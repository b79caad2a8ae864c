"""The protein app's recipe: what to fold (`data`), with which model and weights (`model`), and
where the results go (`output`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.config import ConfigError, InferenceRecipe, LaunchConfig, OutputConfig, opt, section

DEMO_FASTA = str(Path(__file__).parent / "data" / "demo.fasta")
PRESETS = ("model_1", "model_2", "model_3", "model_4", "model_5",
           "model_1_ptm", "model_2_ptm", "model_3_ptm", "model_4_ptm", "model_5_ptm")


@dataclass
class ProteinModelConfig:
    preset: str = opt("model_1", "AlphaFold preset (OpenFold's config names)", choices=PRESETS)
    params: str = opt("", "weights: AlphaFold params_<preset>.npz or an OpenFold .pt checkpoint; '' = random "
                          "weights (no real prediction, for trying the app)")
    evoformer_blocks: int = opt(0, "Evoformer blocks; 0 = the preset's 48", min=0)
    extra_msa_blocks: int = opt(0, "extra-MSA stack blocks; 0 = the preset's 4", min=0)
    structure_blocks: int = opt(0, "structure module iterations; 0 = the preset's 8", min=0)
    recycles: int = opt(3, "recycling iterations", min=0)
    engine: str = opt("loom", "the Evoformer and extra-MSA stacks: loom (in place, in blocks sized to memory.budget_gb, "
                              "axial parallelism under torchrun) or openfold (its own stacks)",
                      choices=("loom", "openfold"))
    dtype: str = opt("float32", "the model's weights and activations", choices=("float32", "bfloat16"))
    pair_dtype: str = opt("same", "engine=loom: the pair representation's dtype; bfloat16 halves it (the largest "
                                  "tensor of a long sequence) while the weights and all arithmetic stay in "
                                  "model.dtype; same = model.dtype", choices=("same", "float32", "bfloat16"))
    chunk_size: int = opt(0, "engine=openfold: OpenFold's chunk size; 0 = no chunking", min=0)
    use_lma: bool = opt(False, "engine=openfold: OpenFold's low-memory attention (Staats & Rabe)")


@dataclass
class ProteinDataConfig:
    fasta: str = opt(DEMO_FASTA, "a FASTA file; every record is one target (default: the bundled demo, ubiquitin)")
    alignments: str = opt("", "a folder with one subfolder per target holding .a3m / .sto alignments; "
                              "'' = single-sequence mode")
    max_msa_clusters: int = opt(512, "MSA cluster rows the model sees", min=1)
    max_extra_msa: int = opt(1024, "extra MSA rows", min=1)


@dataclass
class ProteinOutputConfig(OutputConfig):
    dir: str = opt("runs/protein", "where each target's results go (one folder per target)")
    mmcif: bool = opt(False, "also write mmCIF next to the PDB")
    overwrite: bool = opt(False, "replace the results an earlier run left in output.dir (its target folders); "
                                 "false = refuse to start when there are some")


@dataclass
class ProteinMemoryConfig:
    budget_gb: float = opt(0.0, "engine=loom: memory each process may use, in GiB; the Evoformer's blocks are "
                                "sized to stay under it and under what is free less a reserve (10% or 128 MiB, "
                                "the larger); 0 = what is free less that reserve",
                           min=0)
    spill_dir: str = opt("", "engine=loom, one process: a folder on a local disk (not tmpfs) for the updates the "
                             "strip triangle multiplication holds back, used only where the Evoformer does not fit "
                             "in memory with them (they reach a quarter of the pair representation; each is written "
                             "and read once); '' = keep everything in memory")


@dataclass
class ProteinLaunchConfig(LaunchConfig):
    auto: bool = opt(False, "plan the layout at launch, as the other apps do; here the plan is fixed: with "
                            "model.engine=loom every process takes a share of the Evoformer's rows and columns "
                            "(axial parallelism) and the blocks are sized to memory.budget_gb (or what is free); "
                            "the run says it in one line")


@dataclass
class ProteinRecipe(InferenceRecipe):
    model: ProteinModelConfig = section(ProteinModelConfig, "the AlphaFold model and its weights")
    data: ProteinDataConfig = section(ProteinDataConfig, "the targets and their alignments")
    parallel: ProteinLaunchConfig = section(ProteinLaunchConfig, "how the processes join; under torchrun they "
                                                                 "split the Evoformer with axial parallelism")
    output: ProteinOutputConfig = section(ProteinOutputConfig, "where results go")
    memory: ProteinMemoryConfig = section(ProteinMemoryConfig, "memory-bounded inference")

    def check(self) -> None:
        if self.model.params and not Path(self.model.params).is_file():
            raise ConfigError(f"model.params: {self.model.params} "
                              + ("is a folder, not a weights file" if Path(self.model.params).is_dir()
                                 else "does not exist"))
        if self.data.alignments and not Path(self.data.alignments).is_dir():
            raise ConfigError(f"data.alignments: {self.data.alignments} is not a folder; give a folder with one "
                              f"subfolder of .a3m / .sto files per target, or '' for single-sequence mode")
        if Path(self.output.dir).exists() and not Path(self.output.dir).is_dir():
            raise ConfigError(f"output.dir: {self.output.dir} is a file; give a folder (it is made if missing)")
        if self.model.engine != "loom" and self.model.pair_dtype != "same":
            raise ConfigError("model.pair_dtype holds the pair representation apart from the model's dtype in Loom's "
                              "engine only; with model.engine=openfold use model.dtype")
        if self.model.engine == "loom" and (self.model.chunk_size or self.model.use_lma):
            raise ConfigError("model.chunk_size and model.use_lma set OpenFold's own chunking (model.engine=openfold); "
                              "with model.engine=loom the blocks follow memory.budget_gb")

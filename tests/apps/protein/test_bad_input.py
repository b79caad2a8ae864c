"""`python -m apps.protein.infer` on bad input: a FASTA file that is not text, a folder where a
file belongs, alignments that are missing or unreadable, weights that are damaged or of another
kind, an output.dir that holds an earlier run's results, a memory budget too small. Each ends with
one `error: ...` line on stderr and exit status 2, no traceback, and nothing written."""

import gzip
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import apps.protein.evoformer as evoformer
import apps.protein.infer as infer
from apps.protein.fasta import read_fasta
from apps.protein.plan import GIB, Shapes, choose, longest, peak_bytes, smallest
from core import cli
from core.errors import LoomError

ROOT = Path(__file__).resolve().parents[3]
UBIQUITIN = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"


def _run(capsys, *args: str) -> tuple[int, str]:
    """The entry point as `python -m apps.protein.infer` runs it: its exit status and stderr."""
    with pytest.raises(SystemExit) as stop:
        cli.run_main(lambda: infer.main(list(args)))
    return stop.value.code, capsys.readouterr().err


def _refused(capsys, out: Path, *args: str) -> str:
    """Run into `out` (which must stay empty or missing), expect a refusal; return its line."""
    code, err = _run(capsys, f"output.dir={out}", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())                  # nothing half-written
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Input checks come before the model: building one fails the test."""
    def build(*a, **k):
        raise AssertionError("the model was built before the input was checked")
    monkeypatch.setattr(infer, "build_model", build)


# -- the FASTA file ---------------------------------------------------------------------------

@pytest.mark.parametrize("data,says", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not a text FASTA file (byte 0x89 at offset 0 is not UTF-8 text)"),
    (b">a\nMKT\xff\xfeY\n", "is not a text FASTA file (byte 0xff at offset 6 is not UTF-8 text)"),
    (b">a\nMK\x00TY\n", "is not a text FASTA file (byte 0x00 at offset 5 is a control character)"),
    (gzip.compress(b">a\nMKTAY\n", mtime=0), "is gzip-compressed, not a text FASTA file; decompress it first"),
    (b"", "no FASTA records"),
])
def test_a_fasta_file_that_is_not_text_is_named_with_its_first_bad_byte(tmp_path, capsys, no_model, data, says):
    (tmp_path / "in.fasta").write_bytes(data)
    line = _refused(capsys, tmp_path / "out", f"data.fasta={tmp_path / 'in.fasta'}")
    assert says in line and str(tmp_path / "in.fasta") in line


def test_random_bytes_as_fasta_end_in_one_line_from_the_real_entry_point(tmp_path):
    (tmp_path / "noise.fasta").write_bytes(random.Random(0).randbytes(4096))
    r = subprocess.run([sys.executable, "-m", "apps.protein.infer", f"data.fasta={tmp_path / 'noise.fasta'}",
                        f"output.dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.fullmatch(r"error: \S+noise\.fasta is not a text FASTA file \(byte 0x[0-9a-f]{2} at offset \d+ is "
                        r"not UTF-8 text\); pass a plain-text file\n", r.stderr), r.stderr
    assert not (tmp_path / "out").exists()


def test_a_byte_order_mark_and_non_ascii_headers_are_still_text(tmp_path):
    path = tmp_path / "bom.fasta"
    path.write_bytes(b"\xef\xbb\xbf>caf\xc3\xa9 protein\nMKTAY\n")
    assert [(t.description, t.sequence) for t in read_fasta(path)] == [("café protein", "MKTAY")]


def test_a_folder_as_the_fasta_file(tmp_path, capsys, no_model):
    line = _refused(capsys, tmp_path / "out", f"data.fasta={tmp_path}")
    assert line == f"error: data.fasta: {tmp_path} is a folder, not a FASTA file"


# -- the alignments ---------------------------------------------------------------------------

def test_a_missing_alignments_folder(tmp_path, capsys, no_model):
    line = _refused(capsys, tmp_path / "out", f"data.alignments={tmp_path / 'msas'}")
    assert f"data.alignments: {tmp_path / 'msas'} is not a folder" in line
    (tmp_path / "msas").mkdir()
    line = _refused(capsys, tmp_path / "out", f"data.alignments={tmp_path / 'msas'}")
    assert f"data.alignments: no folder {tmp_path / 'msas' / 'ubiquitin'} for target 'ubiquitin'" in line


@pytest.mark.parametrize("name,data,says", [
    ("hits.a3m", bytes(range(256)), "hits.a3m is not a text alignment (byte 0x00 at offset 0 is a control character)"),
    ("hits.a3m", b"", "hits.a3m holds no sequences"),
    ("hits.a3m", f">query\n{UBIQUITIN}\n>hit\nMQIFV\n".encode(),
     "hits.a3m: aligned sequence 2 has 5 columns, but target 'ubiquitin' has 76 residues"),
    ("hits.a3m", f">query\n{UBIQUITIN}\n>hit\n{UBIQUITIN[:-1]}.\n".encode(),
     "hits.a3m: aligned sequence 2 has letters that are not amino acids or gaps: '.'"),
    ("hits.a3m", f"{UBIQUITIN}\n".encode(), "hits.a3m is not a readable alignment (an A3M file is '>name' lines"),
    ("hits.sto", b"# STOCKHOLM 1.0\nquery MQIF extra words\n//\n",
     "hits.sto is not a readable alignment (a Stockholm file is"),
])
def test_an_unreadable_alignment_is_named_before_the_model_is_built(tmp_path, capsys, no_model, name, data, says):
    (tmp_path / "msas" / "ubiquitin").mkdir(parents=True)
    (tmp_path / "msas" / "ubiquitin" / name).write_bytes(data)
    line = _refused(capsys, tmp_path / "out", f"data.alignments={tmp_path / 'msas'}")
    assert line.startswith(f"error: data.alignments: {tmp_path / 'msas' / 'ubiquitin'}/") and says in line, line


# -- the weights ------------------------------------------------------------------------------

def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _weights(tmp_path: Path, kind: str) -> Path:
    if kind == "text":
        (tmp_path / "params.txt").write_text("not weights\n")
        return tmp_path / "params.txt"
    if kind == "npz-truncated":
        np.savez(tmp_path / "params_model_1.npz", a=np.zeros((64, 64), np.float32))
        return _truncated(tmp_path / "params_model_1.npz")
    if kind == "npz-text":
        (tmp_path / "params_model_1.npz").write_text("not an archive\n")
        return tmp_path / "params_model_1.npz"
    if kind == "pt-truncated":
        torch.save({"w": torch.zeros(64, 64)}, tmp_path / "weights.pt")
        return _truncated(tmp_path / "weights.pt")
    if kind == "pt-list":
        torch.save([1, 2, 3], tmp_path / "weights.pt")
        return tmp_path / "weights.pt"
    if kind == "pt-shape":
        torch.save({"evoformer.blocks.0.msa_att_row.layer_norm_m.weight": torch.zeros(3)}, tmp_path / "weights.pt")
        return tmp_path / "weights.pt"
    raise ValueError(kind)


@pytest.fixture(scope="module")
def small_alphafold():
    """OpenFold's AlphaFold as the demo recipe builds it, with small channels (cheap to build)."""
    from openfold.model.model import AlphaFold

    from apps.protein.config import ProteinRecipe
    from core.config import load_recipe

    def build(evoformer_blocks: int = 2):
        config = infer.openfold_config(load_recipe(ProteinRecipe, "protein/demo"))
        config.globals.c_m, config.globals.c_z, config.globals.c_e, config.globals.c_s = 32, 16, 16, 24
        config.model.evoformer_stack.no_blocks = evoformer_blocks
        return AlphaFold(config)
    return build


@pytest.mark.parametrize("kind,says", [
    ("text", "is neither AlphaFold params (.npz) nor a weights file torch can read safely (.pt): it is damaged, "
             "truncated, another kind of file, or a checkpoint that holds Python objects besides tensors"),
    ("npz-truncated", "is not a readable .npz archive (damaged, truncated or another kind of file); "
                      "download params_model_1.npz again"),
    ("npz-text", "is not a readable .npz archive"),
    ("pt-truncated", "is neither AlphaFold params (.npz) nor a weights file torch can read safely (.pt)"),
    ("pt-list", "holds no state dict of weights (names to tensors)"),
    ("pt-shape", "does not fit model.preset=model_1 and its block counts: size mismatch for "
                 "evoformer.blocks.0.msa_att_row.layer_norm_m.weight"),
])
def test_weights_of_another_kind_or_damaged_are_refused(tmp_path, small_alphafold, kind, says):
    from apps.protein.model import load_params

    path = _weights(tmp_path, kind)
    with pytest.raises(LoomError) as refusal:
        load_params(small_alphafold(), path, "model_1")
    message = str(refusal.value)
    assert message.startswith(f"model.params: {path} ") and says in message and "\n" not in message, message


def test_damaged_weights_end_the_run_in_one_line(tmp_path, capsys):
    path = _weights(tmp_path, "pt-truncated")
    line = _refused(capsys, tmp_path / "out", f"model.params={path}")
    assert line.startswith(f"error: model.params: {path} is neither AlphaFold params (.npz) nor")


def test_a_folder_as_the_weights_or_a_file_as_the_output(tmp_path, capsys, no_model):
    line = _refused(capsys, tmp_path / "out", f"model.params={tmp_path}")
    assert line == f"error: model.params: {tmp_path} is a folder, not a weights file"
    (tmp_path / "out.txt").write_text("mine\n")
    code, err = _run(capsys, f"output.dir={tmp_path / 'out.txt'}")
    assert code == 2 and err == f"error: output.dir: {tmp_path / 'out.txt'} is a file; give a folder (it is made " \
                                "if missing)\n"
    assert (tmp_path / "out.txt").read_text() == "mine\n"


def test_a_separate_pair_dtype_with_openfolds_stacks_is_refused(tmp_path, capsys, no_model):
    line = _refused(capsys, tmp_path / "out", "model.engine=openfold", "model.pair_dtype=bfloat16")
    assert line.startswith("error: model.pair_dtype holds the pair representation apart from the model's dtype in "
                           "Loom's engine only")


def test_parallel_auto_says_its_fixed_plan_in_one_line_and_runs(tmp_path, capsys):
    # as in the other apps' recipes, parallel.auto=true plans at launch; here there is nothing to
    # choose, and the run says what it does
    out = tmp_path / "out"
    (tmp_path / "one.fasta").write_text(f">first\n{UBIQUITIN[:24]}\n")
    code, err = _run(capsys, f"output.dir={out}", f"data.fasta={tmp_path / 'one.fasta'}", "parallel.auto=true",
                     "memory.budget_gb=2", "model.evoformer_blocks=1", "model.structure_blocks=1")
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("auto-parallel plan")] == [
        "auto-parallel plan for 1 process(es): one process (torchrun --nproc-per-node N splits the Evoformer N "
        "ways); the Evoformer's blocks sized to memory.budget_gb=2 a process"]
    assert (out / "first" / "first.pdb").is_file()
    from apps.protein.config import ProteinRecipe
    from core.config import load_recipe

    cfg = load_recipe(ProteinRecipe, "protein/demo", ["parallel.auto=true"])
    assert infer.auto_plan(cfg, 4) == ("auto-parallel plan for 4 process(es): axial parallelism over 4 processes "
                                       "(each a share of the pair representation's rows and columns); the "
                                       "Evoformer's blocks sized to the memory free in each process, less a reserve")


def test_alphafold_params_with_other_block_counts_are_refused(tmp_path, small_alphafold):
    """OpenFold's importer would load the first blocks of a deeper file and leave the rest random."""
    from apps.protein.model import load_params
    from tests.apps.protein.test_infer import _write_alphafold_npz

    _write_alphafold_npz(small_alphafold(evoformer_blocks=2), "model_1", tmp_path / "params_model_1.npz")
    with pytest.raises(LoomError, match=r"holds 2 blocks of alphafold/alphafold_iteration/evoformer/evoformer_iteration"
                                        r"/\S+, where the model has 1; set model.evoformer_blocks"):
        load_params(small_alphafold(evoformer_blocks=1), tmp_path / "params_model_1.npz", "model_1")
    load_params(small_alphafold(evoformer_blocks=2), tmp_path / "params_model_1.npz", "model_1")   # the same fit


# -- the output folder ------------------------------------------------------------------------

def test_an_earlier_runs_results_are_refused_before_the_model_is_built(tmp_path, capsys, no_model):
    out = tmp_path / "out"
    (out / "ubiquitin").mkdir(parents=True)
    (out / "ubiquitin" / "ubiquitin.pdb").write_text("earlier\n")
    (out / "other").mkdir()
    (out / "other" / "timings.json").write_text("{}\n")
    code, err = _run(capsys, f"output.dir={out}")
    assert code == 2 and "Traceback" not in err
    assert err == (f"error: output.dir {out} already holds results (target folders: other, ubiquitin) from an "
                   f"earlier run; start over with output.overwrite=true, or choose another output.dir\n")
    assert (out / "ubiquitin" / "ubiquitin.pdb").read_text() == "earlier\n"
    # folders without a run's results in them are no earlier run
    (out / "ubiquitin" / "ubiquitin.pdb").unlink()
    (out / "other" / "timings.json").unlink()
    (out / "other" / "notes.txt").write_text("mine\n")
    code, err = _run(capsys, f"output.dir={out}", f"data.fasta={tmp_path / 'missing.fasta'}")
    assert code == 2 and err == f"error: FASTA file {tmp_path / 'missing.fasta'} does not exist\n"


def test_overwrite_replaces_the_earlier_results_and_keeps_what_else_is_there(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "ubiquitin").mkdir(parents=True)
    (out / "ubiquitin" / "ubiquitin.pdb").write_text("earlier\n")
    (out / "ubiquitin" / "ubiquitin.cif").write_text("earlier\n")     # this run writes no mmCIF
    (out / "gone").mkdir()
    (out / "gone" / "gone.pdb").write_text("earlier\n")
    (out / "gone" / "timings.json").write_text("{}\n")
    (out / "kept").mkdir()
    (out / "kept" / "gone.pdb").write_text("someone's\n")
    (out / "notes.txt").write_text("someone's\n")
    (tmp_path / "short.fasta").write_text(f">ubiquitin\n{UBIQUITIN[:24]}\n")              # folds quickly
    code, err = _run(capsys, f"output.dir={out}", "output.overwrite=true", f"data.fasta={tmp_path / 'short.fasta'}",
                     "model.evoformer_blocks=1", "model.structure_blocks=1")
    assert code == 0, err
    assert (out / "ubiquitin" / "ubiquitin.pdb").read_text().startswith("REMARK")
    assert not (out / "ubiquitin" / "ubiquitin.cif").exists() and not (out / "gone").exists()
    assert (out / "kept" / "gone.pdb").read_text() == (out / "notes.txt").read_text() == "someone's\n"
    assert sorted(p.name for p in out.iterdir()) == ["kept", "notes.txt", "ubiquitin"]


def test_a_stopped_run_keeps_the_finished_targets_and_no_half_written_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    (tmp_path / "two.fasta").write_text(f">first\n{UBIQUITIN[:24]}\n>second\n{UBIQUITIN[24:48]}\n")
    plot = infer._plot

    def plot_then_stop(path, name, *rest):
        if name == "second":                              # Ctrl-C while the second target is written
            raise KeyboardInterrupt
        plot(path, name, *rest)

    monkeypatch.setattr(infer, "_plot", plot_then_stop)
    with pytest.raises(SystemExit) as stop:
        cli.run_main(lambda: infer.main([f"output.dir={out}", f"data.fasta={tmp_path / 'two.fasta'}",
                                         "model.evoformer_blocks=1", "model.structure_blocks=1"]), infer.STOPPED)
    assert stop.value.code == 130
    assert capsys.readouterr().err.endswith("interrupted; the targets finished so far are complete in output.dir\n")
    assert sorted(f.name for f in (out / "first").iterdir()) == ["first.pdb", "plddt.png", "timings.json"]
    assert not (out / "second").exists()                  # its files wait in a hidden folder, never published
    # the next run (output.overwrite=true) clears the leftovers and publishes both
    monkeypatch.setattr(infer, "_plot", plot)
    code, err = _run(capsys, f"output.dir={out}", f"data.fasta={tmp_path / 'two.fasta'}", "output.overwrite=true",
                     "model.evoformer_blocks=1", "model.structure_blocks=1")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["first", "second"]
    assert (out / "second" / "timings.json").is_file()


# -- the memory budget ------------------------------------------------------------------------

def _holds(monkeypatch, used: int) -> None:
    """The process holds `used` bytes when the Evoformer starts, with plenty free."""
    monkeypatch.setattr(evoformer, "process_bytes", lambda device: used)
    monkeypatch.setattr(evoformer, "free_bytes", lambda device: 64 * GIB)


# The demo model's extra-MSA stack (model_1's channels), the first stack a 200-residue target meets,
# with the one extra-MSA row the demo recipe keeps.
EXTRA_MSA = Shapes(s=1, n=200, c_m=64, c_z=128, heads_msa=8, c_att=8, c_opm=32, c_mul=128, heads_pair=4,
                   c_pair_att=32, transition_n=4, extra=True)


def test_a_budget_below_what_the_process_holds_names_the_longest_sequence_that_fits(tmp_path, capsys, monkeypatch):
    (tmp_path / "long.fasta").write_text(">long\n" + (UBIQUITIN * 3)[:200] + "\n")
    used = GIB + (4 << 20)                            # 4 MiB over the budget; z alone is 20 MiB at 200 residues
    _holds(monkeypatch, used)
    code, err = _run(capsys, f"data.fasta={tmp_path / 'long.fasta'}", f"output.dir={tmp_path / 'out'}",
                     "memory.budget_gb=1")
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert err.count("error: ") == 1 and line.startswith("error: memory.budget_gb=1.00 is less than the 1.00 GiB")
    fits = int(re.search(r"the longest sequence that fits is about (\d+) residues", line).group(1))
    assert line.endswith("Raise memory.budget_gb or fold a shorter sequence")
    assert not (tmp_path / "out").exists()
    # what the budget leaves besides the weights, inputs and runtime (all the process holds but m
    # and z) holds the stack at that length in its smallest chunks, and not one residue more
    room = GIB - (used - (200 * 64 + 200 * 200 * 128) * 4)
    assert 0 < fits < 200 and fits == longest(EXTRA_MSA, room)
    at, beyond = (replace(EXTRA_MSA, n=n) for n in (fits, fits + 1))
    assert peak_bytes(at, smallest(at)) <= room < peak_bytes(beyond, smallest(beyond))


def test_a_budget_nothing_fits_names_the_floor(tmp_path, capsys, monkeypatch):
    _holds(monkeypatch, GIB)
    code, err = _run(capsys, f"output.dir={tmp_path / 'out'}", "memory.budget_gb=0.5")
    assert code == 2 and "Traceback" not in err and err.count("error: ") == 1
    line = err.strip().splitlines()[-1]
    floor = float(re.search(r"no sequence fits: even a 1-residue one needs about ([\d.]+) GiB", line).group(1))
    assert line.startswith("error: memory.budget_gb=0.50 is less than the 1.00 GiB") and 1.0 <= floor < 1.05
    assert line.endswith("Raise memory.budget_gb") and "fold a shorter" not in line
    assert not (tmp_path / "out").exists()


def test_the_planners_refusal_names_the_floor_where_not_even_one_residue_fits():
    sh = Shapes(s=1, n=76, c_m=256, c_z=128, heads_msa=8, c_att=32, c_opm=32, c_mul=128, heads_pair=4,
                c_pair_att=32, transition_n=4, extra=False)
    assert longest(sh, 1 << 20) == 0
    with pytest.raises(LoomError, match=r"no sequence fits: even a 1-residue one needs about 0\.51 GiB\. Raise"):
        choose(sh, 1 << 20, outside=GIB // 2)

"""A non-editable install (`pip install .`) works outside the source checkout: every console
script answers --help, every app finds its default recipe by name, and the files the code reads at
run time (the kernel's C++ source, the protein demo sequence) are installed with it.

The project is built into a fresh virtual environment from a copy of the tracked files; that
environment sees this one's packages (torch, diffusers, OpenFold) through a plain path entry, so
nothing is downloaded and the editable install of this checkout is not visible to it.
"""

import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.commands import run_at_once

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _run(args, cwd, timeout=300):
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "host_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    built = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                  str(source)], cwd=tmp)
    assert built.returncode == 0, built.stderr[-3000:]
    work = tmp / "elsewhere"
    work.mkdir()
    return venv, work


def test_every_console_script_answers_help(installed):
    venv, work = installed
    answers = run_at_once([[venv / "bin" / name, "--help"] for name in SCRIPTS], env=_env(), cwd=work)
    for name, done in zip(SCRIPTS, answers):
        assert done.returncode == 0, (name, done.stderr[-2000:])
        assert "usage:" in done.stdout, name


def test_every_console_script_ends_as_the_module_does(installed):
    # every script is its module's `console` (main under core.cli.run_main: exit statuses, one
    # line for a refusal, no traceback); two of them are run on a bad key to show it
    assert all(target.endswith(":console") for target in SCRIPTS.values()), SCRIPTS
    venv, work = installed
    names = ("loom-gpt-pretrain", "loom-protein-infer")
    for name, done in zip(names, run_at_once([[venv / "bin" / name, "train.nonexistent=1"] for name in names],
                                             env=_env(), cwd=work)):
        assert done.returncode == 2, (name, done.returncode, done.stderr[-2000:])
        assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, (name, done.stderr[-2000:])


def test_the_installed_code_finds_its_recipes_and_files(installed):
    venv, work = installed
    shipped = sorted(str(p.relative_to(ROOT / "recipes").with_suffix("")) for p in (ROOT / "recipes").rglob("*.yaml")
                     if p.parent.name != "clusters")
    probe = ("import core, loom_kernels.cpu_adam as k, apps.protein.config as pc; from core.config import known_recipes, "
             "resolve_recipe; from pathlib import Path; from core.autoparallel.cluster import find_cluster; "
             "from core.autoparallel.target import target_for; "
             "print(core.__file__); print(' '.join(known_recipes())); "
             "print(resolve_recipe('protein/demo')); print((k._HERE / 'cpu_adam.cpp').is_file(), "
             "Path(pc.DEMO_FASTA).is_file()); print(find_cluster('a100-1024')); "
             "print(target_for('gpt/tiny').name, target_for('diffusion/tiny-shapes').name); "
             "from apps.gpt.hf import resolve_folder; print(resolve_folder('gpt/models/llama-tiny') / 'config.json')")
    done = _run([str(venv / "bin" / "python"), "-c", probe], cwd=work)
    assert done.returncode == 0, done.stderr[-2000:]
    where, names, demo, files, cluster, planned, llama = done.stdout.splitlines()
    assert where.startswith(str(venv)) and not where.startswith(str(ROOT))
    assert names.split() == shipped                 # every recipe of every app ships
    assert demo.startswith(str(venv / "share" / "loom-train" / "recipes"))
    assert files == "True True"
    # the planner's cluster files ship, and the GPT and diffusion apps register their planning targets
    assert cluster.startswith(str(venv / "share" / "loom-train" / "recipes" / "clusters")), cluster
    assert planned == "gpt diffusion"
    # the Llama recipe's model folder ships beside the recipes
    assert llama.startswith(str(venv / "share" / "loom-train" / "recipes")) and Path(llama).is_file(), llama


def test_the_protein_app_runs_its_default_recipe_from_the_install(installed):
    venv, work = installed
    done = _run([str(venv / "bin" / "loom-protein-infer"), "output.dir=out"], cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "out" / "ubiquitin" / "ubiquitin.pdb").stat().st_size > 10_000


def test_no_other_installed_distribution_claims_a_loom_package_name():
    # Loom's fused kernels once lived in a top-level package named `kernels`: the import name of
    # Hugging Face's `kernels`, which transformers 5 installs and imports. Loom's folder shadowed
    # it and every Hugging Face model failed to import. Each top-level package Loom ships must be
    # Loom's alone among what this environment has installed.
    from importlib.metadata import packages_distributions

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = [p.rstrip("*") for p in patterns]
    assert all((ROOT / top / "__init__.py").is_file() for top in tops), tops
    claimed = packages_distributions()
    others = {top: sorted(set(claimed.get(top, [])) - {"loom-train"}) for top in tops}
    assert not any(others.values()), f"installed distributions that ship the same import name: {others}"

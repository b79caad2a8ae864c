"""The command line shared by every entry point: `--recipe`, dot-list overrides, `--help`, and
how a run ends.

Exit statuses (`run_main`), the same on every rank of a job that is still alive:

    0    done
    2    a LoomError: a bad recipe, input or layout, a full disk, a NaN loss. One line from
         rank 0 says what to fix.
    3    the job lost a process (killed, crashed, or silent past parallel.timeout_s). One line
         from the lowest surviving rank names the lost ranks (`core.distributed.failure`);
         the checkpoints written so far are intact: restart with train.resume=latest.
    130  interrupted (Ctrl-C)
    143  stopped by SIGTERM with no process lost
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Sequence, TypeVar

from core.config import ConfigError, Recipe, describe, known_recipes, load_recipe
from core.distributed import failure
from core.distributed.launch import DistEnv, detect
from core.errors import LoomError

T = TypeVar("T", bound=Recipe)


def _usage(prog: str, summary: str, default_recipe: str, training: bool) -> str:
    example = "train.steps=50 parallel.dp=2" if training else "output.dir=runs/mine"
    spread = " parallel.dp=N" if training else ""
    return (f"usage: {prog} [--recipe NAME_OR_PATH] [key=value ...]\n\n{summary}\n\n"
            f"  --recipe NAME_OR_PATH  a recipe file, or a name such as {default_recipe} "
            f"(default: {default_recipe})\n"
            f"  key=value              override one recipe key, e.g. {example}\n"
            f"  -h, --help             print this and every recipe key with its default and meaning\n\n"
            f"Known recipes: {', '.join(r for r in known_recipes() if r.split('/')[0] == default_recipe.split('/')[0])}\n"
            f"Many processes: torchrun --standalone --nproc-per-node N -m {prog.split()[-1]}{spread}")


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
        print(_usage(prog, summary, default_recipe, issubclass(schema, Recipe)))
        print(f"\nRecipe keys (recipe shown: {recipe}):")
        print(describe(schema, values))
        return None
    return load_recipe(schema, recipe, overrides)


def _where() -> DistEnv:
    try:
        return detect()
    except LoomError:   # unreadable launcher variables: treat as a single process
        return DistEnv()


def _refuse(error: LoomError, guard: failure.SignalGuard) -> None:
    """One line from rank 0, status 2 from every rank."""
    guard.hold(exit_status=2)   # torchrun stopping this rank from now on changes nothing
    env = _where()
    line = f"error: {error}"
    failure.write_error_file(line)   # torchrun shows it in its report
    if env.rank == 0:
        print(line, file=sys.stderr)
    # Under torchrun: tell the others, and wait for them to decide (see note_refusal).
    rank0_refused = failure.note_refusal(str(error))
    if env.rank != 0 and rank0_refused is False:   # rank 0 will not say it
        print(f"error: on rank {env.rank}: {error}", file=sys.stderr)
    elif env.rank != 0 and rank0_refused:
        # Let rank 0 exit first, so that torchrun reports its line as the root cause; torchrun
        # then stops this rank (SIGTERM: status 2 at once).
        time.sleep(failure.GRACE_S)
    sys.exit(2)


def _lost(error: BaseException, guard: failure.SignalGuard, after: failure.Aftermath) -> None:
    """A peer is gone or the launcher stopped us: find out who, one line for the whole job."""
    guard.hold()   # further SIGTERMs wait for the roll call
    verdict = failure.roll_call(error, after=after)
    failure.write_error_file(verdict.message)
    if verdict.line:
        print(verdict.line, file=sys.stderr)
    sys.exit(verdict.status)


def run_main(main: Callable[[], int | None], after: failure.Aftermath = failure.TRAINING) -> None:
    """Run an entry point; every way it ends is one exit status (see the module's docstring) and
    at most one line for the whole job, without a traceback. `after`: what a stopped run of this
    entry point keeps and how to go on (a training run's checkpoints by default)."""
    with failure.SignalGuard() as guard:
        try:
            code = main()
        except LoomError as e:
            _refuse(e, guard)
        except BrokenPipeError:  # output piped into `head` and the like
            sys.stderr.close()
            sys.exit(0)
        except KeyboardInterrupt:
            guard.hold(exit_status=130)
            if _where().rank == 0:
                print(f"interrupted; {after.kept}", file=sys.stderr)
            sys.exit(130)
        except failure.Stopped as e:
            _lost(e, guard, after)
        except Exception as e:
            if not failure.is_peer_failure(e):
                raise
            _lost(e, guard, after)
    sys.exit(code or 0)

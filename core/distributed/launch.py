"""Starting a run: read the launcher's environment, pick the device, join the process group.

Three ways in, one result (`Runtime`):

- **torchrun** (or anything that sets `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`):
  the variables are used as they are. Many machines work the same way as one.
- **Slurm** (`srun python -m ...`, one task per process): `SLURM_PROCID`, `SLURM_NTASKS`,
  `SLURM_LOCALID` and the job's node list give the rank, the world and the first host.
- **Nothing**: one process, no process group at all.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping

import torch
import torch.distributed as dist

from core.errors import LoomError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # "torchrun" | "env" | "slurm" | "single"


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LoomError(f"environment variable {name}={env[name]!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise LoomError(f"cannot read the Slurm node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _slurm_tasks_on_node(value: str) -> int:
    """SLURM_TASKS_PER_NODE such as '4(x2),3' -> tasks on the first node (4)."""
    m = re.match(r"(\d+)", value)
    return int(m.group(1)) if m else 1


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The launcher's view of this process, from environment variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        return DistEnv(
            rank=_int(env, "RANK"), world_size=world,
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            local_world_size=_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
            launcher="torchrun" if "TORCHELASTIC_RUN_ID" in env else "env")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        job = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"), world_size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            local_world_size=_slurm_tasks_on_node(env.get("SLURM_TASKS_PER_NODE", "1")),
            master_addr=env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1"),
            # One port per job, so two jobs sharing a node do not collide.
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + job % 20000,
            launcher="slurm")
    return DistEnv()


@dataclass(frozen=True)
class Runtime:
    """This process's place in the job, its compute device and its backend."""

    env: DistEnv
    device: torch.device
    backend: str

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LoomError("parallel.device=cuda but this torch build sees no CUDA device "
                        f"(torch {torch.__version__}); use parallel.device=cpu or install a CUDA build")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise LoomError(f"local rank {local_rank} has no GPU: this node has {count}; "
                        f"start at most {count} processes per node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def pick_backend(requested: str, device: torch.device) -> str:
    if requested != "auto":
        if requested == "nccl" and device.type != "cuda":
            raise LoomError("parallel.backend=nccl needs CUDA devices; use gloo on CPU")
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def launch(device: str = "auto", backend: str = "auto", timeout_s: int = 1800,
           environ: Mapping[str, str] | None = None) -> Iterator[Runtime]:
    """Join the job for the duration of the block, and leave it cleanly afterwards.

    With one process no process group is created. A process group that already exists (a
    test harness made it) is reused and left alone.
    """
    env = detect(environ)
    dev = pick_device(device, env.local_rank)
    be = pick_backend(backend, dev)
    created = False
    if env.world_size > 1 and not dist.is_initialized():
        # Under torchrun, env:// joins the store its agent already hosts; elsewhere rank 0 hosts one.
        init = "env://" if env.launcher == "torchrun" else f"tcp://{env.master_addr}:{env.master_port}"
        try:
            dist.init_process_group(be, init_method=init, rank=env.rank, world_size=env.world_size,
                                    timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise LoomError(f"rank {env.rank} could not join the process group at "
                            f"{env.master_addr}:{env.master_port}: {str(e).splitlines()[0]}") from None
        created = True
    elif dist.is_initialized():
        env = DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(),
                      local_rank=env.local_rank, local_world_size=env.local_world_size,
                      master_addr=env.master_addr, master_port=env.master_port, launcher=env.launcher)
        be = dist.get_backend()
    try:
        yield Runtime(env=env, device=dev, backend=be)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()

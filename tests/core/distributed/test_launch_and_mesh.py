"""Reading the launcher's environment, and fitting a parallel layout to the world size."""

import pytest
import torch

from core.distributed import Layout, ParallelMesh, detect, launch, resolve_layout
from core.distributed.launch import first_host
from core.distributed.testing import run_distributed
from core.errors import LoomError


def test_torchrun_environment():
    env = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "node7", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 1, 2)
    assert (env.master_addr, env.master_port, env.launcher) == ("node7", 1234, "torchrun")


def test_slurm_environment():
    env = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                  "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[003-004]",
                  "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.master_addr == "gpu003" and env.master_port == 20000 + 123456 % 20000
    assert env.launcher == "slurm"


def test_torchrun_inside_slurm_wins_and_no_launcher_is_one_process():
    env = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "1", "WORLD_SIZE": "4"})
    assert (env.rank, env.world_size) == (1, 4)
    single = detect({})
    assert (single.rank, single.world_size, single.launcher) == (0, 1, "single")


@pytest.mark.parametrize("nodelist, host", [("node1", "node1"), ("a[07-09,12],b2", "a07"),
                                            ("x[5]", "x5")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_bad_environment_is_one_clear_error():
    with pytest.raises(LoomError, match="WORLD_SIZE='four' is not an integer"):
        detect({"RANK": "0", "WORLD_SIZE": "four"})


def test_single_process_launch_has_no_process_group():
    import torch.distributed as dist
    with launch(device="cpu") as rt:
        assert rt.world_size == 1 and rt.device == torch.device("cpu") and rt.backend == "gloo"
        assert not dist.is_initialized()


def test_layout_resolution():
    assert resolve_layout(0, 1, 2, 1, 8) == Layout(dp=4, tp=2)
    assert resolve_layout(2, 2, 2, 1, 8) == Layout(dp=2, pp=2, tp=2)
    assert resolve_layout(0, 1, 1, 1, 1) == Layout()


def test_layout_that_does_not_fit_names_the_ones_that_do():
    with pytest.raises(LoomError) as e:
        resolve_layout(2, 1, 4, 1, 4)
    msg = str(e.value)
    assert "needs 8 processes but the world size is 4" in msg
    # closest first: keep tp=4 and shrink dp
    assert "layouts that fit 4 processes: dp=1 tp=4 | dp=2 tp=2 |" in msg
    with pytest.raises(LoomError, match=r"parallel.tp=3 x parallel.pp=1 x parallel.sp=1 = 3 does not divide the world size 4"):
        resolve_layout(0, 1, 3, 1, 4)


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(LoomError, match="parallel.device=cuda but this torch build sees no CUDA"):
        with launch(device="cuda"):
            pass


def _mesh_on_8():
    mesh = ParallelMesh.build(Layout(dp=2, pp=2, tp=2))
    return {a: (mesh.rank(a), mesh.size(a), mesh.axis(a).ranks) for a in ("pp", "dp", "sp", "tp")}


def test_mesh_axes_on_8_ranks():
    results = run_distributed(_mesh_on_8, world_size=8)
    for rank, axes in enumerate(results):
        pp, dp, tp = rank // 4, (rank // 2) % 2, rank % 2
        assert axes["tp"] == (tp, 2, (rank - tp, rank - tp + 1))
        assert axes["dp"] == (dp, 2, tuple(pp * 4 + d * 2 + tp for d in range(2)))
        assert axes["pp"] == (pp, 2, (dp * 2 + tp, 4 + dp * 2 + tp))
        assert axes["sp"] == (0, 1, (rank,))

"""Which plugin a recipe gets with tensor parallelism and ZeRO, and the refusals of what does not
run together yet (on 2 gloo ranks: tp=2)."""


from core.config import Recipe, load_recipe
from core.distributed import Layout, ParallelMesh
from core.distributed.testing import run_distributed
from core.errors import LoomError


def _choices():
    from core.booster import make_plugin

    mesh = ParallelMesh.build(Layout(tp=2))
    out = {}
    for name, overrides in (("zero2", ["parallel.zero=2"]), ("zero3", ["parallel.zero=3"]),
                            ("offload", ["parallel.zero=2", "parallel.offload=cpu"])):
        try:
            out[name] = make_plugin(load_recipe(Recipe, None, overrides), mesh).name
        except LoomError as e:
            out[name] = str(e)
    return out


def test_tensor_parallelism_runs_with_zero_1_and_2_and_refuses_the_rest():
    got = run_distributed(_choices, world_size=2)[0]
    assert got["zero2"] == "zero"
    for name in ("zero3", "offload"):
        assert "ZeRO-3, offload or a device budget together with parallel.tp" in got[name], got[name]
        assert "tensor parallelism with ZeRO-1/2" in got[name]

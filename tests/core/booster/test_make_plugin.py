"""Which plugin a recipe gets with tensor parallelism and ZeRO (on 2 gloo ranks: tp=2): the chunked
engine at every stage and offload."""


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


def test_tensor_parallelism_runs_with_every_zero_stage_and_offload():
    got = run_distributed(_choices, world_size=2)[0]
    assert got == {"zero2": "zero", "zero3": "zero", "offload": "zero"}

"""The session's checks at start: what is wrong with the layout itself comes first."""

import pytest

from core.config import Recipe, load_recipe
from core.errors import LoomError
from core.session import session


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=3", "parallel.tp_mode=2d"], "parallel.tp_mode=2d needs a square parallel.tp"),
    (["parallel.tp=4", "parallel.tp_mode=3d"], "parallel.tp_mode=3d needs a cube parallel.tp"),
    (["parallel.tp=4", "parallel.tp_mode=2d"], "= 4 does not divide the world size 1"),
])
def test_the_first_thing_wrong_is_named(overrides, message, tmp_path):
    cfg = load_recipe(Recipe, None, [f"output.dir={tmp_path}", "parallel.device=cpu", *overrides])
    with pytest.raises(LoomError, match=message):
        with session(cfg):
            pass


@pytest.mark.parametrize("mode, tp, depth, micro, parts", [("2d", 4, 1, 3, 2), ("2.5d", 8, 2, 2, 4), ("3d", 8, 1, 6, 4)])
def test_a_micro_batch_the_tensor_parallel_mode_cannot_split_is_refused_before_any_process_joins(
        mode, tp, depth, micro, parts, tmp_path):
    from core.layout import check_layout

    cfg = load_recipe(Recipe, None, [f"output.dir={tmp_path}", f"parallel.tp={tp}", f"parallel.tp_mode={mode}",
                                     f"parallel.tp_depth={depth}", f"train.micro_batch={micro}"])
    with pytest.raises(LoomError) as refusal:
        check_layout(cfg, tp)
    assert str(refusal.value) == (f"train.micro_batch={micro} does not split into the {parts} batch parts of "
                                  f"parallel.tp_mode={mode} (parallel.tp={tp}); use a multiple of {parts}")
    cfg.train.micro_batch = micro * parts
    assert check_layout(cfg, tp)[0].tp == tp

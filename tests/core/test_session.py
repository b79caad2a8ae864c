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

"""The test harness reports a failing rank's traceback and a hanging rank."""

import pytest
import torch
import torch.distributed as dist

from core.distributed.testing import RankTimeout, run_distributed


def _rank_one_fails():
    if dist.get_rank() == 1:
        raise ValueError("rank one says no")
    return dist.get_rank()


def _rank_one_never_joins():
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))
    else:
        import time
        time.sleep(60)


def _rank_and_world():
    return dist.get_rank(), dist.get_world_size()


def test_results_come_back_in_rank_order():
    assert run_distributed(_rank_and_world, world_size=2) == [(0, 2), (1, 2)]


def test_failing_rank_fails_the_call_with_its_traceback():
    with pytest.raises(Exception) as e:
        run_distributed(_rank_one_fails, world_size=2)
    text = str(e.value)
    assert "rank one says no" in text and "ValueError" in text and "_rank_one_fails" in text


def test_hanging_rank_is_killed_and_reported():
    with pytest.raises(RankTimeout, match=r"ranks \[.*\] of 2 still running"):
        run_distributed(_rank_one_never_joins, world_size=2, timeout=6)

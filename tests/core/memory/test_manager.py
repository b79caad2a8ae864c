"""The chunk manager: packing, the budget, the policies, prefetching, meta-device models."""

import pytest
import torch
from torch import nn

from core.errors import LoomError
from core.memory.manager import AutoPolicy, ChunkManager, StaticPolicy
from core.memory.state import TensorState
from core.memory.store import MemoryStore

CHUNK = 64            # elements: one 8x8 weight per chunk
CHUNK_BYTES = CHUNK * 4


def _model(layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(8, 8, bias=False) for _ in range(layers)))


def _manager(model, budget_chunks=2, policy=None, prefetch=0, **kw) -> ChunkManager:
    return ChunkManager(model, CHUNK, torch.float32, torch.device("cpu"), MemoryStore(),
                        budget_chunks * CHUNK_BYTES, policy or AutoPolicy(), prefetch, **kw)


def _use(manager, order):
    before = manager.stats.fetches
    for i in order:
        manager.access(manager.chunks[i])
        assert manager.resident_bytes <= manager.budget
        # the running count is the payloads really held, through evictions and prefetches
        assert manager.resident_bytes == sum(c.payload.untyped_storage().nbytes() for c in manager.chunks)
    manager.end_step()
    return manager.stats.fetches - before


def test_packing_keeps_values_and_makes_parameters_views():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    m = _manager(model, budget_chunks=3)
    assert len(m.chunks) == 3 and all(c.used == CHUNK for c in m.chunks)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
        chunk, info = m.where[p]
        assert p.untyped_storage().data_ptr() == chunk.payload.untyped_storage().data_ptr()


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("mixed", [False, True])
def test_a_pool_serves_fetches_with_evicted_memory_within_the_budget(prefetch, mixed):
    """Chunks cycle through room for two. Of one size, after the first round every fetch takes an
    evicted payload's memory (no fresh pages); of two sizes, pooled memory of the other size is
    freed first. Values come back right either way, and pooled memory counts against the budget."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 6, bias=False), nn.Linear(6, 8, bias=False),
                          nn.Linear(8, 8, bias=False)) if mixed else _model(4)
    before = [p.detach().clone() for p in model.parameters()]
    m = _manager(model, budget_chunks=2, prefetch=prefetch, trim=True, pool=True)
    assert [c.nbytes for c in m.chunks] == ([256, 192, 192, 256] if mixed else [256] * 4)
    fetched = m.stats.fetches
    for _ in range(3):
        for i, p in enumerate(model.parameters()):
            m.access(m.chunks[i])
            assert torch.equal(p.detach(), before[i])
            assert m.held_bytes <= m.budget and m.resident_bytes <= m.held_bytes
        m.end_step()
    fetches = m.stats.fetches - fetched
    assert fetches >= 8 and m.stats.peak_resident <= m.budget
    if not mixed:
        assert m.pool.reused >= fetches - 2


def test_the_budget_evicts_and_a_fetch_brings_the_values_back():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    m = _manager(model, budget_chunks=2)
    assert m.resident_bytes == 2 * CHUNK_BYTES and not m.chunks[0].resident   # built in order, oldest left
    assert all(i.state is TensorState.FREE for i in m.chunks[0].tensors)
    m.access(m.chunks[0])
    assert torch.equal(model[0].weight.detach(), before[0])
    assert m.stats.evictions == 2 and m.resident_bytes <= m.budget


def test_furthest_next_use_beats_lru_on_a_cyclic_trace():
    """0,1,2,0,1,2 with room for two chunks: LRU always evicts the chunk needed next (every access
    misses); after one traced step the auto policy evicts the one used furthest ahead."""
    m = _manager(_model(), budget_chunks=2)
    first = _use(m, [0, 1, 2, 0, 1, 2])
    second = _use(m, [0, 1, 2, 0, 1, 2])
    assert first == 6              # LRU: every access misses
    assert second == 3             # furthest-next-use: only the compulsory misses


def test_prefetch_follows_the_traced_order():
    m = _manager(_model(4), budget_chunks=2, prefetch=1)
    assert _use(m, [0, 1, 2, 3]) == 4
    assert m.stats.prefetch_hits == 0        # no trace yet: nothing to prefetch from
    assert _use(m, [0, 1, 2, 3]) == 4        # the same transfers...
    assert m.stats.prefetch_hits == 3        # ...but all after the first started before they were asked for


def test_a_budget_below_two_chunks_is_refused():
    with pytest.raises(LoomError, match=r"memory.device_gb allows 256 B .* at least two chunks \(512 B"):
        _manager(_model(), budget_chunks=1)


def test_a_parameter_larger_than_a_chunk_gets_a_chunk_of_its_own():
    """One large matrix does not make every chunk as large as itself (SD v1.5's 49 K x 768 token
    embedding would leave a 0.5 GB budget room for three chunks instead of seven)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 24, bias=False), nn.Linear(8, 8, bias=False))
    before = [p.detach().clone() for p in model.parameters()]
    m = _manager(model, budget_chunks=5)
    assert [c.capacity for c in m.chunks] == [CHUNK, 3 * CHUNK, CHUNK]
    assert m.chunk_bytes == CHUNK_BYTES and all(c.resident for c in m.chunks)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    small = _manager(nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 24, bias=False),
                                   nn.Linear(8, 8, bias=False)), budget_chunks=4)
    _use(small, [0, 1, 2, 1, 0])                    # within the budget at every access (_use checks)
    assert [c.resident for c in small.chunks] == [True, True, False]   # the large chunk and a small one
    with pytest.raises(LoomError, match=r"at least two chunks \(1.0 KiB: the largest two\)"):
        _manager(nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 24, bias=False)), budget_chunks=3)


def test_static_policy_keeps_its_fraction_off_the_device():
    m = _manager(_model(4), budget_chunks=4, policy=StaticPolicy(0.5))
    assert [c.resident for c in m.chunks] == [True, True, False, False]
    m.access(m.chunks[3])
    m.release(m.chunks[3])                 # used, then straight back home
    assert [c.resident for c in m.chunks] == [True, True, False, False]


def test_a_meta_model_is_built_chunk_by_chunk_and_tied_weights_stay_tied():
    with torch.device("meta"):
        model = nn.Sequential(nn.Embedding(8, 8), nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    model[2].weight = model[0].weight
    made = []

    def materialize(name, out):
        made.append(name)
        out.copy_(torch.full(out.shape, float(len(made))))

    m = _manager(model, budget_chunks=2, materialize=materialize)
    assert made == ["0.weight", "1.weight"]            # the tied weight once
    assert model[2].weight is model[0].weight and not model[0].weight.is_meta
    m.access(m.chunks[0])
    assert torch.equal(model[0].weight.detach(), torch.ones(8, 8))
    with pytest.raises(LoomError, match="meta device"):
        with torch.device("meta"):
            other = nn.Linear(8, 8)
        _manager(other)


def test_the_last_chunk_of_each_kind_holds_no_more_than_is_left():
    """Frozen weights then a few trained ones (a LoRA): the trained chunk is their size, not a
    whole chunk with states and gradient buffers to match; full chunks keep the chunk size."""
    from core.memory.chunk import plan_chunks

    planned = plan_chunks([600, 600, 300, 10, 6], 1000, trained=[False, False, False, True, True], world=4)
    assert [(c.used, c.capacity, c.trained) for c in planned] == [(600, 1000, False), (900, 900, False),
                                                                  (16, 16, True)]

"""Generation through `core.inference`: batched, left-padded prompts with a KV cache, micro-batches,
and weights streamed from host memory or NVMe under a budget, against the model's own generation
(the whole window recomputed at every step, one prompt at a time)."""

import pytest
import torch

from apps.gpt.config import GPTModelConfig
from apps.gpt.model import GPT
from core.errors import LoomError
from core.inference.engine import Engine
from core.inference.placement import Machine, ModelSize, plan
from core.inference.steps import KVCache, make_step
from core.inference.stream import WeightStream, plan_layers, smallest_budget

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [3], [20, 21, 22]]


def reference(model, prompts, new):
    return [model.generate(torch.tensor([p]), new, temperature=0)[0, len(p):].tolist() for p in prompts]


def gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTModelConfig(vocab_size=97, seq_len=64, n_layer=3, n_head=4, d_model=32)).eval()


def hf_model(kind, folder):
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    from core.hf import HFCausalLM

    config = {"opt": OPTConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                               max_position_embeddings=64, word_embed_proj_dim=32),
              "llama": LlamaConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
              "gpt2": GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)}[kind]
    config.bos_token_id = config.eos_token_id = 0
    config.save_pretrained(folder)
    torch.manual_seed(0)
    return HFCausalLM.from_folder(folder).eval(), lambda: HFCausalLM.from_folder(folder)


def streamed(make_meta, weights, where, layers_held, tmp_path, chunk_mb=0.004):
    """An engine whose weights stream from `where` through a budget of `layers_held` times the
    largest layer (a number above 1000: that many bytes). `where`: "host", "nvme" (direct IO into
    the chunks' buffers) or "mapped" (NVMe through the page cache: the file's mapping)."""
    with torch.device("meta"):
        meta = make_meta()
    layers = meta.inference_layers()
    sizes, per_layer, _, _ = plan_layers(meta, layers, int(chunk_mb * 2**20 / 4), torch.float32)
    budget = int(layers_held * smallest_budget(sizes, per_layer)) if layers_held < 1000 else int(layers_held)
    mapped = where == "mapped"
    stream = WeightStream(meta, layers, "nvme" if mapped else where, budget, torch.float32, torch.device("cpu"),
                          chunk_mb=chunk_mb, nvme_dir=tmp_path / "nvme", direct=not mapped,
                          materialize=lambda name, out: out.copy_(weights[name]))
    assert stream.mapped == (mapped and budget < stream.total_bytes)
    return Engine(meta, "cpu", stream=stream, layers=layers), stream


def test_mask_and_positions_of_left_padded_rows():
    cache = KVCache(1, 8)
    step = make_step(torch.tensor([0, 2]), 3, cache)
    assert step.positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    # row 1: two pads; its padding queries see themselves, its real query sees itself alone
    assert step.mask[1, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert step.mask[0, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    cache.advance(3)
    step = make_step(torch.tensor([0, 2]), 1, cache)
    assert step.positions.tolist() == [[3], [1]]
    assert step.mask[:, 0, 0].int().tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]


@pytest.mark.parametrize("batch, micro", [(5, 1), (2, 2), (1, 5)])
def test_batched_generation_equals_one_prompt_at_a_time(batch, micro):
    model = gpt()
    result = Engine(model, "cpu").generate(PROMPTS, 9, batch_size=batch, micro_batches=micro)
    assert result.tokens == reference(model, PROMPTS, 9)
    assert result.token_steps == 9 * len(PROMPTS)
    assert result.kv_bytes > 0


def test_new_token_steps_run_the_micro_batches_through_a_layer_as_one_batch():
    """The prompts go through a layer a micro-batch at a time (their activations are the large
    ones); each later step runs every micro-batch's one new token as one batch, so a weight is
    read from memory once for all of them. Tokens as one prompt at a time either way."""
    model = gpt()
    engine = Engine(model, "cpu")
    seen = []
    for layer in engine.layers[1:-1]:
        run = layer.run
        layer.run = lambda h, step, run=run: (seen.append(tuple(h.shape[:2])), run(h, step))[1]
    result = engine.generate(PROMPTS, 4, batch_size=2, micro_batches=3)
    assert result.tokens == reference(model, PROMPTS, 4)
    blocks = len(engine.layers) - 2
    prefill, decode = seen[:3 * blocks], seen[3 * blocks:]
    assert sorted(set(prefill)) == [(1, 7), (2, 7)]            # three micro-batches, prompts whole
    assert decode == [(5, 1)] * (3 * blocks)                   # then all five rows at once


def test_new_token_passes_run_on_the_decode_threads_and_prompts_on_all():
    """Where weights stream on the CPU the reading thread needs a core: a new-token pass (bound by
    memory) runs on `decode_threads`, the prompts' pass (bound by compute) on all of torch's."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = gpt()
        engine = Engine(model, "cpu", decode_threads=1)
        seen = []
        run = engine.layers[1].run
        engine.layers[1].run = lambda h, step: (seen.append((h.shape[1], torch.get_num_threads())), run(h, step))[1]
        result = engine.generate(PROMPTS[:2], 3, batch_size=2)
        assert result.tokens == reference(model, PROMPTS[:2], 3)
        assert seen == [(5, 2), (1, 1), (1, 1)]
        assert torch.get_num_threads() == 2                      # given back
    finally:
        torch.set_num_threads(before)


def test_a_cache_part_writes_its_rows_of_the_whole():
    whole = KVCache(1, 4, rows=3)
    part = whole.part(1, 3)
    k, v = part.update(torch.ones(2, 1, 2, 2), 2 * torch.ones(2, 1, 2, 2), 0)
    assert k.shape == (2, 1, 2, 2) and bool((v == 2).all())
    assert torch.equal(whole.keys[0][1:, :, :2], torch.ones(2, 1, 2, 2))
    with pytest.raises(ValueError, match="rows 2..4"):
        whole.part(2, 4)
    with pytest.raises(ValueError, match="3 rows against a KV cache of 2"):
        part.update(torch.ones(3, 1, 1, 2), torch.ones(3, 1, 1, 2), 0)


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2"])
def test_hugging_face_families_generate_with_the_cache(kind, tmp_path):
    model, make = hf_model(kind, tmp_path)
    ref = reference(model, PROMPTS, 8)
    assert Engine(model, "cpu").generate(PROMPTS, 8, batch_size=3, micro_batches=2).tokens == ref
    # streamed from NVMe under a budget of two layers: every step reads most of the model again,
    # into the chunks' buffers (direct IO) or through the file's mapping (the page cache)
    weights = dict(model.named_parameters())
    for where in ("nvme", "mapped"):
        engine, stream = streamed(make, weights, where, 2, tmp_path)
        try:
            result = engine.generate(PROMPTS, 8, batch_size=2, micro_batches=2)
        finally:
            stream.close()
        assert result.tokens == ref, where
        assert result.bytes_read > 4 * stream.total_bytes
        assert not (tmp_path / "nvme").exists() or not any((tmp_path / "nvme").iterdir())   # scratch removed


@pytest.mark.parametrize("where", ["host", "nvme", "mapped"])
def test_streamed_weights_equal_in_memory_and_stay_within_the_budget(where, tmp_path):
    model = gpt()
    ref = reference(model, PROMPTS, 10)
    weights, make = dict(model.named_parameters()), lambda: GPT(model.cfg)

    for held, micro in ((2, 1), (2.5, 3), (10**8, 1)):
        engine, stream = streamed(make, weights, where, held, tmp_path)
        budget = stream.manager.budget
        try:
            result = engine.generate(PROMPTS, 10, batch_size=2, micro_batches=micro)
            stats = stream.manager.stats
        finally:
            stream.close()
        assert result.tokens == ref, (budget, micro)
        assert stats.peak_resident <= budget
        passes = 10 * -(-len(PROMPTS) // (2 * micro))
        if budget < stream.total_bytes:
            # everything the budget cannot keep is read again at each pass, ahead of its use
            assert result.bytes_read >= passes * (stream.total_bytes - budget)
            assert stats.prefetch_hits > stats.fetches // 2
        else:
            assert result.bytes_read == 0


def test_a_mapped_stream_serves_layers_out_of_order(tmp_path):
    """Through the file's mapping, a layer asked for out of the expected order (a pass cut short,
    a jump back) still reads its own weights, and the window stays within the budget."""
    model = gpt()
    weights = dict(model.named_parameters())
    engine, stream = streamed(lambda: GPT(model.cfg), weights, "mapped", 2, tmp_path)
    try:
        assert stream.manager.pool is None or stream.manager.pool.bytes == 0     # no buffers kept idle
        live = dict(stream.model.named_parameters())
        for i in (0, 1, 3, 0, 2, 2, 4, 1):
            with stream.resident(i):
                names = [n for n in live if any(n.startswith(m) for m in stream.layers[i].modules)]
                assert names and all(torch.equal(live[n], weights[n]) for n in names)
            assert stream.manager.stats.peak_resident <= stream.manager.budget
    finally:
        stream.close()


def test_a_file_the_system_will_not_map_is_read_into_chunk_buffers(tmp_path, monkeypatch):
    from core.memory.store import NVMeStore

    def refuse(self, kind):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(NVMeStore, "map", refuse)
    model = gpt()
    weights = dict(model.named_parameters())
    with torch.device("meta"):
        meta = GPT(model.cfg)
    layers = meta.inference_layers()
    sizes, per_layer, _, _ = plan_layers(meta, layers, int(0.004 * 2**20 / 4), torch.float32)
    budget = 2 * smallest_budget(sizes, per_layer)
    stream = WeightStream(meta, layers, "nvme", budget, torch.float32, torch.device("cpu"), chunk_mb=0.004,
                          nvme_dir=tmp_path / "nvme", direct=False,
                          materialize=lambda name, out: out.copy_(weights[name]))
    try:
        assert not stream.mapped and stream.total_bytes > stream.manager.budget
        result = Engine(meta, "cpu", stream=stream, layers=layers).generate(PROMPTS, 6, batch_size=2)
    finally:
        stream.close()
    assert result.tokens == reference(model, PROMPTS, 6) and result.bytes_read > 0


def test_micro_batches_share_one_weight_pass(tmp_path):
    """N micro-batches through each layer while it is resident: the weights are read once per pass
    of all of them, not once per micro-batch."""
    model = gpt()
    weights, make = dict(model.named_parameters()), lambda: GPT(model.cfg)

    reads = {}
    for micro in (1, 4):
        engine, stream = streamed(make, weights, "nvme", 2, tmp_path)
        try:
            prompts = PROMPTS[:4] * 2
            reads[micro] = engine.generate(prompts, 6, batch_size=2, micro_batches=micro).bytes_read
        finally:
            stream.close()
    assert reads[4] * 3 < reads[1]


def test_stop_token_and_sampling():
    model = gpt()
    first = Engine(model, "cpu").generate(PROMPTS, 6).tokens
    stop = first[0][2]                       # the third greedy token of the first prompt
    result = Engine(model, "cpu").generate(PROMPTS, 6, stop=stop).tokens
    assert result[0] == first[0][:2]
    for full, cut in zip(first, result):
        assert cut == (full[:full.index(stop)] if stop in full else full)
    g = torch.Generator().manual_seed(3)
    sampled = Engine(model, "cpu").generate(PROMPTS, 6, temperature=1.0, top_k=10, top_p=0.9, generator=g).tokens
    g = torch.Generator().manual_seed(3)
    again = Engine(model, "cpu").generate(PROMPTS, 6, temperature=1.0, top_k=10, top_p=0.9, generator=g).tokens
    assert sampled == again and sampled != first


def test_a_budget_below_one_layer_is_refused_naming_the_smallest(tmp_path):
    model = gpt()
    weights = dict(model.named_parameters())
    with pytest.raises(LoomError, match=r"smallest budget that runs is memory\.device_gb=") as e:
        streamed(lambda: GPT(model.cfg), weights, "nvme", 0.5, tmp_path)
    gib = float(str(e.value).split("memory.device_gb=")[-1].split()[0])
    engine, stream = streamed(lambda: GPT(model.cfg), weights, "nvme", int(gib * 2**30) + 1, tmp_path)
    stream.close()


SIZE = ModelSize(weight_bytes=13 * 2**30, min_budget=420 * 2**20, params=6_700_000_000, layers=32, width=4096,
                 kv_width=4096, vocab=50272, element=2)
CPU = Machine(device_bytes=8 * 2**30, host_bytes=8 * 2**30, flops=2e11, memory_bw=2e10, disk_read=1.3e9,
              host_link=float("inf"), cpu_only=True, layer_seconds=1e-4)


def test_placement_streams_from_disk_and_prefers_more_micro_batches_when_disk_bound():
    p = plan(SIZE, CPU, batch=8, prompt=64, new_tokens=32, rows=64, weight_budget=2**31)
    assert p.weights == "nvme" and p.micro_batches > 1 and p.weight_budget == 2**31
    one = plan(SIZE, CPU, batch=8, prompt=64, new_tokens=32, rows=64, micro_batches=1, weight_budget=2**31)
    assert p.tokens_per_second > 2 * one.tokens_per_second
    # fits: stays on the device and reads nothing
    small = ModelSize(**{**SIZE.__dict__, "weight_bytes": 2**30, "params": 500_000_000})
    fit = plan(small, CPU, batch=8, prompt=64, new_tokens=32, rows=8)
    assert fit.weights == "device" and fit.read_per_pass == 0
    assert any("chosen" in line for line in p.lines)


def test_placement_refuses_a_budget_below_one_layer_naming_the_smallest():
    with pytest.raises(LoomError, match=r"the smallest budget that runs is memory\.device_gb=") as e:
        plan(SIZE, CPU, batch=8, prompt=64, new_tokens=32, rows=8, weight_budget=300 * 2**20)
    gib = float(str(e.value).split("memory.device_gb=")[-1].split()[0])
    assert plan(SIZE, CPU, batch=8, prompt=64, new_tokens=32, rows=8,
                weight_budget=int(gib * 2**30) + 1).weights == "nvme"
    with pytest.raises(LoomError, match="parallel.offload=none"):
        plan(SIZE, CPU, batch=8, prompt=64, new_tokens=32, rows=8, offload="none")
    # a device too small for one layer and one micro-batch's cache: said, with what to lower
    tight = Machine(**{**CPU.__dict__, "device_bytes": 300 * 2**20})
    with pytest.raises(LoomError, match="lower --batch-size"):
        plan(SIZE, tight, batch=8, prompt=64, new_tokens=32, rows=8)

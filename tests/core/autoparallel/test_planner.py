"""The auto-parallel planner: the profile taken on the meta device is what a real model measures;
the search finds what scoring every layout finds; a request nothing fits is refused naming the
change that would fit; the command writes a recipe the app accepts."""

import dataclasses
import math
import os
import pytest
import torch
import yaml

from apps.gpt.config import GPTRecipe
from apps.gpt.model import GPT
from apps.gpt.planning import profile as gpt_profile
from core.autoparallel import GIB, Cluster, Job, Layout, PlanError, best_plan, brute_force, estimate, search
from core.autoparallel.cluster import cluster_from_dict
from core.autoparallel.search import all_layouts
from core.autoparallel.profile import _Saved
from core.config import ConfigError, load_recipe
from core.layout import check_layout


def _recipe(**model) -> GPTRecipe:
    cfg = load_recipe(GPTRecipe, "gpt/tiny")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=256, **model))


def test_the_meta_profile_is_what_the_real_model_measures():
    cfg = _recipe(n_layer=2, d_model=64, n_head=4, seq_len=32)
    prof = gpt_profile(cfg)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    assert prof.params == sum(p.numel() for p in model.parameters())      # the tied head counted once
    h, s, v = 64, 32, 256
    block = prof.layers[1]
    # a block's forward per token: 2 x (3h^2 + h^2 + 4h^2 + 4h^2) for the linears, q.k and p.v over
    # every key (2 x 2 x s x h), as FlopCounterMode counts attention
    assert block.flops == 2 * 12 * h * h + 4 * s * h
    assert prof.layers[-1].flops == 2 * h * v                              # the head
    assert [layer.name for layer in prof.layers] == ["embed", "block0", "block1", "head"]
    # the activations: a real forward on real tensors, through the same hook, keeps as many bytes,
    # the loss's (its log-probabilities, tokens x vocabulary) with the head's
    idx = torch.randint(0, v, (1, s + 1))
    x = idx[:, :-1]
    params = {id(p) for p in model.parameters()}
    layers = model.pipeline_layers()
    for layer, want in zip(layers, prof.layers):
        saved = _Saved(params, h)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            x = layer.fn(x)
            if layer is layers[-1]:
                model.loss(x, idx[:, 1:])
        assert (saved.split / s, saved.whole / s) == (want.act_split, want.act_whole), layer.name
    assert prof.layers[-1].act_split >= v * 4                     # the log-probabilities at least
    # the Linears' kept inputs: qkv's and fc's (the LayerNorms' outputs), the attention output, the
    # GELU's (4h), and the head's
    assert [x.linear_in for x in prof.layers] == [0, 7 * h * 4, 7 * h * 4, h * 4]
    assert block.boundary == h * 4


def test_frozen_layers_have_no_backward_gradients_or_states():
    from core.autoparallel.profile import profile_layers

    cfg = _recipe(n_layer=2, d_model=64, n_head=4, seq_len=32)
    whole = gpt_profile(cfg)
    with torch.device("meta"):
        model = GPT(cfg.model)
        sample = torch.zeros(1, 33, dtype=torch.long)
    for p in [*model.wpe.parameters(), *model.blocks[0].parameters()]:
        p.requires_grad_(False)
    prof = profile_layers(model, sample[:, :-1], lambda logits: model.loss(logits, sample[:, 1:]), hidden=64,
                          heads=4, vocab=256)
    embed, block0, block1, head = prof.layers
    # block0 is frozen but the trained token embedding precedes it: its backward is its
    # activations' gradients alone, about its forward; block1 adds its weights', about twice
    assert block0.trained_params == 0 and 0.75 <= block0.backward_flops / block0.flops <= 1.25
    assert block1.trained_params == block1.params and 1.5 <= block1.backward_flops / block1.flops <= 2.5
    assert embed.trained_params == embed.params - 32 * 64              # wpe (32 x 64) frozen, wte trained
    assert prof.trained_params < whole.trained_params == whole.params
    frozen = Job(prof, 4)
    full = Job(whole, 4)
    lay = Layout(dp=1, micro_batch=4)
    a, b = (estimate(job, lay, CLUSTERS["4 devices, roomy"]) for job in (frozen, full))
    gone = whole.params - prof.trained_params
    assert b.memory["optimizer states"] - a.memory["optimizer states"] == pytest.approx(8 * gone)
    assert a.times["compute"] < b.times["compute"]


def _toy_job(layers=8, hidden=256, heads=8, seq=256, vocab=1024, batch=16, **kw) -> Job:
    cfg = _recipe(n_layer=layers, d_model=hidden, n_head=heads, seq_len=seq)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    return Job(gpt_profile(cfg), batch, **kw)


CLUSTERS = {
    "4 devices, roomy": Cluster(nodes=1, devices_per_node=4, device_memory_gb=4.0, nvme_gb=0),
    "8 devices over 2 nodes, tight, NVMe": Cluster(nodes=2, devices_per_node=4, device_memory_gb=0.06,
                                                   host_memory_gb=4, nvme_gb=10),
    "2 devices, tight, host only": Cluster(nodes=1, devices_per_node=2, device_memory_gb=0.08, host_memory_gb=1),
}


@pytest.mark.parametrize("name", list(CLUSTERS))
def test_the_search_finds_what_scoring_every_layout_finds(name):
    cluster = CLUSTERS[name]
    job = _toy_job()
    every = brute_force(job, cluster)
    found = search(job, cluster, top=3)
    assert every, "the case should have layouts that fit"
    assert [(e.step_s, e.device_bytes) for e in found.ranked] == [(e.step_s, e.device_bytes) for e in every[:3]]


def test_the_search_skips_most_layouts_on_a_larger_cluster():
    cluster = Cluster(nodes=2, devices_per_node=8, device_memory_gb=16)
    job = _toy_job(layers=16, batch=64)
    found = search(job, cluster, top=1)
    every = brute_force(job, cluster)
    assert found.ranked and found.ranked[0].step_s == every[0].step_s
    layouts = list(all_layouts(job, cluster))
    assert found.visited < len(layouts) / 2, (found.visited, len(layouts))
    # offload is scored as Loom runs it: in the chunked engine with a ZeRO stage, each layout once
    assert all(lay.zero for lay in layouts if lay.offload != "none") and len(set(layouts)) == len(layouts)


def test_more_memory_sharding_never_costs_memory_and_the_bubble_follows_the_schedule():
    job = dataclasses.replace(_toy_job(), chunk_mb=0.5)       # chunks much smaller than the model
    cluster = CLUSTERS["4 devices, roomy"]
    base = Layout(dp=4, micro_batch=1, microbatches=4)
    mem = [estimate(job, dataclasses.replace(base, zero=z), cluster).device_bytes for z in range(4)]
    # Loom's stages 1 and 2 keep the same bytes between steps (a chunk's full gradient buffer lives
    # until it is reduced, then only this rank's shard); stage 2's reduce-scatter makes that shard
    # beside the buffer, where stage 1's all-reduce works in the buffer, but by the first reduction
    # backward has freed about a chunk's share of the activations, which may hold it
    chunk = 4 * max(job.chunk_mb * 2**20 / 4, job.profile.largest)     # bytes: no parameter is split
    assert mem[0] > mem[1] and 0 <= mem[2] - mem[1] <= chunk / 4 and mem[2] > mem[3]
    # on a CPU-only machine the states offloaded to the host stay in the process's memory
    cpu = dataclasses.replace(cluster, device_is_host=True)
    zero3 = dataclasses.replace(base, zero=3)
    here = [estimate(job, dataclasses.replace(zero3, offload=o), cpu) for o in ("none", "cpu")]
    assert here[1].host_bytes == 0 and here[1].memory["host copies"] >= here[0].memory["optimizer states"]
    assert estimate(job, dataclasses.replace(zero3, offload="cpu"), cluster).device_bytes < here[0].device_bytes
    assert estimate(job, dataclasses.replace(base, checkpointing=True), cluster).device_bytes < mem[0]
    pipe = Layout(dp=1, pp=4, micro_batch=1, microbatches=16)
    one = estimate(job, pipe, cluster)
    inter = estimate(job, dataclasses.replace(pipe, pp_schedule="interleaved", virtual_stages=2), cluster)
    busy = one.step_s - one.times["bubble"] - one.times["gradient sync (exposed)"] - one.times["fixed costs"]
    assert one.times["bubble"] == pytest.approx(3 / 16 * busy, rel=1e-9)          # (p - 1) / m of the busy time
    assert inter.times["bubble"] < one.times["bubble"]
    # four processes sharing two cores: a stage in the bubble leaves its core to the busy ones, so the
    # bubble is what the critical path at a core each adds beyond the work (none here: 19/16 x 2/4 < 1)
    shared = dataclasses.replace(cluster, device_is_host=True, host_cores=2)
    alone = estimate(job, pipe, dataclasses.replace(shared, host_cores=0))
    assert alone.times["bubble"] == pytest.approx(3 / 16 * busy, rel=1e-9)
    assert estimate(job, pipe, shared).times["bubble"] == 0.0
    few = dataclasses.replace(pipe, micro_batch=4, microbatches=4)             # (4 + 3) / 4 x 2/4 = 7/8 < 1
    assert estimate(job, few, shared).times["bubble"] == 0.0
    one_core = estimate(job, few, dataclasses.replace(shared, host_cores=1))    # 7/4 x 1/4 < 1 as well
    assert one_core.times["bubble"] == 0.0
    few16 = dataclasses.replace(pipe, micro_batch=16, microbatches=1)          # 4 x 2/4 = 2: one step of work more
    sharing = estimate(job, few16, shared)
    t = sharing.times
    assert t["bubble"] == pytest.approx(sharing.step_s - t["bubble"] - t["gradient sync (exposed)"] - t["fixed costs"],
                                        rel=1e-9)


def test_a_request_nothing_fits_names_the_smallest_change_that_would():
    cfg = load_recipe(GPTRecipe, "gpt/gpt2-xl-nvme")
    job = Job(gpt_profile(cfg), 8, "bf16")
    small = Cluster(nodes=1, devices_per_node=1, device_memory_gb=8, host_memory_gb=8, nvme_gb=0)
    with pytest.raises(PlanError) as err:
        best_plan(job, small)
    text = str(err.value)
    assert text.startswith("no layout of this 1.56 B-parameter model fits"), text
    assert "GiB of NVMe per node" in text and " nodes (" in text, text
    # what it names is enough, and the node count the least that is (nodes are tried doubling)
    disk = float(text.split(" GiB of NVMe")[0].rsplit(" ", 1)[1].replace(",", ""))
    assert best_plan(job, dataclasses.replace(small, nvme_gb=disk)).best.layout.offload == "nvme"
    nodes = int(text.split(" nodes (")[0].rsplit(" ", 1)[1])
    assert best_plan(job, dataclasses.replace(small, nodes=nodes))
    with pytest.raises(PlanError):
        best_plan(job, dataclasses.replace(small, nodes=nodes // 2))


def test_a_cluster_file_is_checked_key_by_key():
    with pytest.raises(ConfigError, match="unknown key 'device_memory' .*did you mean device_memory_gb"):
        cluster_from_dict({"device_memory": 8})
    with pytest.raises(ConfigError, match="nodes: got 0; allowed: a number above 0"):
        cluster_from_dict({"nodes": 0})
    with pytest.raises(ConfigError, match="tflops"):
        cluster_from_dict({"tflops": {"int8": 5}})
    with pytest.raises(ConfigError, match="all_reduce_us: .* in increasing bytes"):
        cluster_from_dict({"all_reduce_us": [[4096, 10], [4, 5]]})
    with pytest.raises(ConfigError, match="all_gather_us: .* in increasing bytes, or a mapping of group sizes"):
        cluster_from_dict({"all_gather_us": {2: [[4096, 10], [4, 5]]}})
    with pytest.raises(ConfigError, match="reduce_scatter_us: group size 1; allowed: whole numbers of at least 2"):
        cluster_from_dict({"reduce_scatter_us": {1: [[4, 5]]}})
    with pytest.raises(ConfigError, match="exchange_us: group size 'two'"):
        cluster_from_dict({"exchange_us": {"two": [[4, 5]]}})
    with pytest.raises(ConfigError, match="memory_overhead: .* at least 1"):
        cluster_from_dict({"memory_overhead": {"plain": 0.5}})
    with pytest.raises(ConfigError, match="device_is_host: got 'yes'; allowed: true or false"):
        cluster_from_dict({"device_is_host": "yes"})
    with pytest.raises(ConfigError, match="runtime_extra_gb: .* a mapping of chunked, tensor"):
        cluster_from_dict({"runtime_extra_gb": {"plain": 0.1}})
    with pytest.raises(ConfigError, match="runtime_extra_gb: .* at least 0"):
        cluster_from_dict({"runtime_extra_gb": {"chunked": -1}})
    assert cluster_from_dict({"nodes": 2, "devices_per_node": 4}).devices == 8
    written = Cluster(runtime_extra_gb={"chunked": 0.001}, graph_kb=20.0)
    assert cluster_from_dict(yaml.safe_load(written.to_yaml())) == written


def test_each_engine_a_layout_uses_adds_its_fixed_memory():
    # what the chunked engine and tensor parallelism hold whatever the model (the host Adam
    # kernel, the tensor-parallel group's collectives): once each, and both where both are used
    job = _toy_job(layers=2, hidden=64, heads=4, seq=32, vocab=256)
    base = CLUSTERS["4 devices, roomy"]
    extra = dataclasses.replace(base, runtime_extra_gb={"chunked": 0.25, "tensor": 0.5})
    runtime = {}
    for name, lay in (("plain", Layout(dp=4, micro_batch=4)), ("zero", Layout(dp=4, micro_batch=4, zero=2)),
                      ("tp", Layout(tp=4, micro_batch=4, microbatches=4)),
                      ("tp zero", Layout(tp=4, micro_batch=4, microbatches=4, zero=1))):
        a, b = estimate(job, lay, base), estimate(job, lay, extra)
        runtime[name] = (b.memory["runtime"] - a.memory["runtime"]) / GIB
        assert b.device_bytes - a.device_bytes == pytest.approx(runtime[name] * GIB)
    assert runtime == pytest.approx({"plain": 0.0, "zero": 0.25, "tp": 0.5, "tp zero": 0.75})


def test_the_command_writes_a_recipe_the_app_runs(tmp_path, capsys):
    from core.plan import main

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"nodes": 1, "devices_per_node": 4, "device_memory_gb": 2}))
    out = tmp_path / "plan.yaml"
    assert main(["--recipe", "gpt/tiny", "--cluster", str(tmp_path / "c.yaml"), "model.n_layer=8",
                 "--out", str(out), "--explain", "--top", "3"]) == 0
    err = capsys.readouterr().err
    assert "top 3 layouts (predicted)" in err and "why the other kinds of layout lost" in err
    plan = yaml.safe_load(out.read_text())
    assert plan["extends"] == "gpt/tiny" and plan["model"]["n_layer"] == 8
    cfg = load_recipe(GPTRecipe, str(out))
    layout, batch = check_layout(cfg, 4)
    assert layout.dp * layout.tp * layout.pp * layout.sp == 4 and cfg.model.n_layer == 8
    # a plan is a recipe of the GPT app: planning it again finds the app through what it extends
    assert main(["--recipe", str(out), "--cluster", str(tmp_path / "c.yaml")]) == 0


def test_calibrate_writes_a_cluster_file_the_planner_reads(tmp_path):
    from core.autoparallel.calibrate import main as calibrate
    from core.autoparallel.cluster import load_cluster

    out = tmp_path / "here.yaml"
    assert calibrate(["--quick", "--devices", "2", "--nvme-dir", str(tmp_path), "--out", str(out)]) == 0
    cluster = load_cluster(str(out))
    assert cluster.devices == 2 and cluster.nvme_gb > 0 and cluster.layer_overhead_us > 0
    assert all(v > 0 for v in cluster.tflops.values())
    assert cluster.nvme_write_gbs > 0 and cluster.host_adam_gparams > 0
    assert cluster.device_is_host                                   # no GPU here: the processes share the host
    assert cluster.host_cores == len(os.sched_getaffinity(0))       # ... and its cores
    # the collectives by size, measured among the two processes (a group of 2), nondecreasing in
    # the size, price what the cost model asks
    tables = (cluster.all_reduce_us, cluster.reduce_scatter_us, cluster.all_gather_us, cluster.exchange_us,
              cluster.all_to_all_us)
    assert all(set(table) == {2} for table in tables)
    for table in (t[2] for t in tables):
        assert len(table) >= 5 and all(b > 0 and t > 0 for b, t in table)
        assert [t for _, t in table] == sorted(t for _, t in table)
    b, t = cluster.reduce_scatter_us[2][-1]
    assert cluster.collective_s(2, b, kind="reduce_scatter") == pytest.approx(t * 1e-6)
    b, t = cluster.all_reduce_us[2][2]
    assert cluster.collective_s(2, b) == pytest.approx(t * 1e-6)
    b, t = cluster.exchange_us[2][-1]
    assert cluster.exchange_s(b * 2, 2, 2) == pytest.approx(t * 2e-6)      # past the largest: linear in the bytes
    assert cluster.collective_s(4, b) is None                      # more ranks than the node has: no table for it


def test_measured_tables_interpolate_between_their_sizes():
    from core.autoparallel.cluster import Cluster

    c = Cluster(devices_per_node=4, all_reduce_us=[[4, 100], [4096, 100], [40960, 1000]])
    assert c.collective_s(4, 1) == pytest.approx(1e-4)                 # below the smallest: its time
    assert c.collective_s(4, 2048) == pytest.approx(1e-4)
    mid = math.sqrt(4096 * 40960)                                      # log-log: the geometric mean's time is
    assert c.collective_s(4, mid) == pytest.approx(math.sqrt(1e-4 * 1e-3))
    assert c.collective_s(4, 81920) == pytest.approx(2e-3)             # past the largest: linear in the bytes
    assert c.collective_s(2, 4096) == pytest.approx(1e-4 / 3)          # 1 ring step of the node's 3
    assert c.collective_s(1, 4096) == 0.0 and Cluster().collective_s(4, 4096) is None


def test_tables_by_group_size_price_each_group_with_its_own():
    from core.autoparallel.calibrate import nondecreasing

    c = cluster_from_dict({"devices_per_node": 8,
                           "all_reduce_us": {2: [[4, 300], [4096, 300]], 8: [[4, 1000], [4096, 1400]]}})
    assert c.collective_s(2, 4096) == pytest.approx(3e-4)              # its own table, not 1/7 of the node's
    assert c.collective_s(8, 4096) == pytest.approx(1.4e-3)
    assert c.collective_s(4, 4096) == pytest.approx(1.4e-3 * 3 / 7)    # not measured: the next larger, by ring steps
    assert c.collective_s(2, 4096, span=16) is None                    # across nodes: no table
    yaml_again = cluster_from_dict(yaml.safe_load(c.to_yaml()))       # the file calibrate writes reads back
    assert yaml_again.all_reduce_us == {2: [[4.0, 300.0], [4096.0, 300.0]], 8: [[4.0, 1000.0], [4096.0, 1400.0]]}
    # a ring exchange and an all-to-all are priced for their group's size the same way (no scaling:
    # every rank of the ring sends once whatever its size)
    c = dataclasses.replace(c, exchange_us={2: [[4, 50]], 8: [[4, 200]]}, all_to_all_us=[[4, 70]])
    assert c.exchange_s(4, 2, 2) == pytest.approx(5e-5) and c.exchange_s(4, 8, 4) == pytest.approx(2e-4)
    assert c.exchange_s(4, 8) == pytest.approx(2e-4) and c.all_to_all_s(4, 8, 2) == pytest.approx(7e-5)
    # calibration's tables: the closest nondecreasing fit (a larger message never costs less)
    assert nondecreasing([3.0, 1.0, 2.0, 5.0, 4.0]) == pytest.approx([2.0, 2.0, 2.0, 4.5, 4.5])
    assert nondecreasing([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]


def test_parallel_auto_without_a_cluster_file_plans_for_this_machine_on_one_node(monkeypatch):
    from apps.gpt.planning import TARGET
    from core.autoparallel.auto import plan_recipe

    cfg = load_recipe(GPTRecipe, "gpt/tiny", ["parallel.auto=true"])
    said = []
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    planned = plan_recipe(cfg, TARGET, 2, said.append)
    assert said[0].startswith("auto-parallel plan for 2 devices") and check_layout(planned, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")            # two nodes of one process
    with pytest.raises(ConfigError, match="on several nodes needs parallel.cluster"):
        plan_recipe(cfg, TARGET, 2, said.append)


def test_parallel_auto_plans_before_the_run_and_says_so(tmp_path):
    from apps.gpt.planning import TARGET
    from core.autoparallel.auto import plan_recipe

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"nodes": 1, "devices_per_node": 2, "device_memory_gb": 1}))
    cfg = load_recipe(GPTRecipe, "gpt/tiny", ["parallel.auto=true", f"parallel.cluster={tmp_path / 'c.yaml'}"])
    said = []
    planned = plan_recipe(cfg, TARGET, 2, said.append)
    assert len(said) == 1 and said[0].startswith("auto-parallel plan for 2 devices: dp")
    layout, batch = check_layout(planned, 2)
    assert batch.global_batch == cfg.train.micro_batch * 2          # what the recipe asked on 2 ranks
    with pytest.raises(ConfigError, match="describes 2 devices, this run has 4 processes"):
        plan_recipe(cfg, TARGET, 4, said.append)
    # the model's own limits: split attention has no dropout, so a model with dropout gets no sp
    from core.autoparallel.target import job_for

    dropped = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.1))
    assert job_for(TARGET, dropped, 2).axes == ("dp", "pp", "tp") and "sp" in job_for(TARGET, cfg, 2).axes


def test_a_layout_still_asking_for_parallel_auto_is_refused_not_ignored():
    # an app plans before it checks its layout (the GPT and diffusion apps); one that cannot plan
    # reaches the check with the request still in it
    from core.errors import LoomError

    cfg = load_recipe(GPTRecipe, "gpt/tiny", ["parallel.auto=true"])
    with pytest.raises(LoomError, match=r"^parallel.auto=true: the demo app cannot plan its own layout yet"):
        check_layout(cfg, 1, what="the demo app")


def test_an_offload_plan_gives_the_chunks_at_least_what_they_hold():
    # the engine refuses a device budget below its two largest chunks; the overlay's budget,
    # rounded, never falls below the chunks the estimate puts on the device
    from core.autoparallel import GIB, overlay

    job = _toy_job(layers=4, hidden=256, heads=8, seq=64, vocab=1024, batch=8)       # 12.8 MiB of weights
    for offload in ("cpu", "nvme"):
        est = estimate(job, Layout(dp=2, micro_batch=2, microbatches=2, zero=1, offload=offload),
                       Cluster(nodes=1, devices_per_node=2, device_memory_gb=1, nvme_gb=10))
        tight = Cluster(nodes=1, devices_per_node=2, nvme_gb=10, memory_reserve=1.0,
                        device_memory_gb=est.device_bytes / GIB)            # no room to spare
        budget = overlay(est, job, tight)["memory"]["device_gb"] * GIB
        assert est.memory["weights"] <= budget <= est.memory["weights"] + 0.1 * 2**20, (offload, budget)


def test_a_tied_weight_is_held_by_both_pipeline_ends():
    from core.autoparallel.estimate import rank_sums

    job = _toy_job(layers=4, hidden=64, heads=4, seq=32, vocab=256)
    prof = job.profile
    head = prof.layers[-1]
    assert head.shared == 256 * 64                                      # the token embedding, owned by embed
    one, two = rank_sums(prof, 2, 1)
    body = [x.params for x in prof.layers]
    assert one.params == sum(body[:3]) and two.params == sum(body[3:]) + 256 * 64


def test_the_parameters_1d_tensor_parallelism_leaves_whole_are_held_whole_on_every_rank():
    from core.distributed.comm import AxisGroup
    from core.tensor.cost import feature_parts
    from core.tensor.one_d import OneD

    cfg = _recipe(n_layer=2, d_model=64, n_head=4, seq_len=32)
    prof = gpt_profile(cfg)
    h, s = 64, 32
    # the position table, each block's two LayerNorms (scale and bias) and its two row Linears'
    # biases, the final LayerNorm
    assert [x.whole for x in prof.layers] == [s * h, 6 * h, 6 * h, 2 * h]
    assert prof.largest_whole == s * h
    with torch.device("meta"):
        rank = GPT(cfg.model, OneD(AxisGroup("tp", 4, 1, (0, 1, 2, 3))))
    held = sum(p.numel() for p in rank.parameters())
    assert held > prof.params / 4                                       # what dividing all by tp says
    lay = Layout(tp=4, micro_batch=4)
    assert estimate(Job(prof, 4), lay, CLUSTERS["4 devices, roomy"]).memory["weights"] == 4 * held
    # the grid modes split them by features, over their q
    assert [feature_parts(m, 4) for m in ("1d", "2d")] == [1, 2] and feature_parts("3d", 8) == 2
    assert feature_parts("2.5d", 8, depth=2) == 2


def test_the_grid_modes_keep_the_gathered_weights_for_backward():
    # 2D and 2.5D multiply by a weight's column of blocks, 1/q of the weight, gathered for the
    # product, which keeps it for backward: a fixed sum per micro-batch, not per token
    h, v = 64, 256
    job = _toy_job(layers=2, hidden=h, heads=4, seq=32, vocab=v)
    # the blocks' Linears keep their matrices (12 h^2), the tied head the token table; the
    # embedding's backward needs only the ids
    assert [x.matrices for x in job.profile.layers] == [0, 12 * h * h, 12 * h * h, v * h]
    cluster = CLUSTERS["4 devices, roomy"]

    def acts(mode, micro, checkpointing=False):
        lay = Layout(tp=4, tp_mode=mode, micro_batch=micro, microbatches=1, zero=1, checkpointing=checkpointing)
        return estimate(job, lay, cluster).memory["activations"]

    gathered = lambda elements: elements / 2 * 4                    # noqa: E731  q = 2, fp32
    assert 2 * acts("2d", 1) - acts("2d", 2) == pytest.approx(gathered(2 * 12 * h * h + v * h))
    # checkpointing: only the recomputed block's, beside the head's
    assert 2 * acts("2d", 1, True) - acts("2d", 2, True) == pytest.approx(gathered(12 * h * h + v * h))
    assert 2 * acts("1d", 1) - acts("1d", 2) == pytest.approx(0, abs=1e-6)


def test_3d_keeps_its_linears_gathered_inputs_and_its_partial_products():
    # 3D gathers a Linear's input over q ranks (its tokens) and keeps that copy for backward: q times
    # the rank's share of the Linears' inputs; each product is partial sums over a q-th of the tokens
    # and a q-th of the outputs, reduce-scattered (gloo copies it and all-reduces the copy)
    h, s, v = 64, 32, 256
    job = _toy_job(layers=2, hidden=h, heads=4, seq=s, vocab=v, batch=8)
    plain = dataclasses.replace(job, profile=dataclasses.replace(
        job.profile, layers=tuple(dataclasses.replace(x, linear_in=0.0) for x in job.profile.layers)))
    cluster = Cluster(nodes=1, devices_per_node=8, device_memory_gb=4.0, nvme_gb=0, device_is_host=True)
    lay = Layout(tp=8, tp_mode="3d", micro_batch=8, microbatches=1)
    a, b = (estimate(j, lay, cluster).memory for j in (job, plain))
    tokens, q = 8 * s, 2
    inputs = sum(x.linear_in for x in job.profile.layers) * tokens
    assert a["activations and gradients"] - b["activations and gradients"] == pytest.approx(inputs * (q - 1) / 8)
    partial = tokens / q * (4 * h) / q * 4                           # the widest: fc's 4h outputs
    assert a["tensor-parallel buffers"] == pytest.approx(partial + partial + partial / q)
    assert "tensor-parallel buffers" not in estimate(job, Layout(tp=8, micro_batch=8, microbatches=1), cluster).memory


def test_nvme_offload_on_the_host_counts_what_the_step_reads_apart_from_backward():
    # on a CPU-only machine the step evicts the working copies before it reads the states, so its
    # transfers share memory with the backward's transients instead of adding to them; the IO
    # threads' bounce buffers (4 IO threads and the main one) stay for the run, a chunk each, at most BOUNCE
    from core.memory.store import BOUNCE

    job = dataclasses.replace(_toy_job(layers=4, hidden=128, heads=4, seq=64, vocab=256), chunk_mb=0.5)
    host = Cluster(nodes=1, devices_per_node=1, device_memory_gb=4, nvme_gb=10, device_is_host=True)
    est = estimate(job, Layout(micro_batch=4, microbatches=1, zero=3, offload="nvme"), host)
    unit = 0.5 * 2**20
    assert est.memory["IO buffers"] == 5 * unit
    during_backward = sum(est.memory[k] for k in ("weights", "gradient buffers", "activations"))
    assert est.memory["host copies"] == max(2 * unit * 16 / 4 - during_backward, 0)
    big = dataclasses.replace(job, chunk_mb=64.0)                    # one chunk holds the whole model
    one = estimate(big, Layout(micro_batch=4, microbatches=1, zero=3, offload="nvme"), host)
    assert one.memory["IO buffers"] == 5 * min(BOUNCE, -(-4 * job.profile.params // 4096) * 4096)


def test_a_pipeline_keeps_per_micro_batch_its_activations_its_sent_output_and_autograd_s_graph():
    from core.autoparallel.estimate import rank_sums

    h, s = 64, 32
    job = _toy_job(layers=4, hidden=h, heads=4, seq=s, vocab=256, batch=16)
    cluster = CLUSTERS["4 devices, roomy"]
    gpipe = Layout(pp=2, pp_schedule="gpipe", micro_batch=1, microbatches=16)
    first, last = rank_sums(job.profile, 2, 1)
    # the first stage's per micro-batch: its kept activations and the output it sent on (kept until
    # its gradient comes back, a hidden state per token); 16 micro-batches in flight
    per_mb = (first.act_split + first.act_whole) * s + h * 4 * s
    loss_grads = 2 * s * 256 * 4                                         # once, on the head's stage
    est = estimate(job, gpipe, cluster)
    acts = max(16 * per_mb, 16 * (last.act_split + last.act_whole) * s + loss_grads)
    grads = 4 * max(first.trained, last.trained) + 2 * 4 * job.profile.largest
    # GPipe's forwards come first: the first backward makes the gradients beside the other 15
    # micro-batches' activations (the busier stage's); with one micro-batch there is nothing beside
    beside = max(15 * per_mb, 15 * (last.act_split + last.act_whole) * s + loss_grads)
    assert est.memory["activations and gradients"] == pytest.approx(max(acts, beside + grads))
    one = estimate(job, dataclasses.replace(gpipe, micro_batch=16, microbatches=1), cluster)
    single = max(16 * per_mb, 16 * (last.act_split + last.act_whole) * s + 16 * loss_grads)
    assert one.memory["activations and gradients"] == pytest.approx(max(single, grads))
    # 1F1B's steady state runs forwards after backwards: all of its 2 micro-batches beside them
    ofob = estimate(job, dataclasses.replace(gpipe, pp_schedule="1f1b"), cluster)
    two = max(2 * per_mb, 2 * (last.act_split + last.act_whole) * s + loss_grads)
    assert ofob.memory["activations and gradients"] == pytest.approx(two + grads)
    # on a CPU-only machine autograd's graph is the device's memory too: a fixed size per layer
    # and micro-batch in flight (here the 15 beside the gradients, on either stage's 3 layers)
    host = dataclasses.replace(cluster, device_is_host=True)
    bare, graphed = (estimate(job, gpipe, dataclasses.replace(host, graph_kb=kb)) for kb in (0.0, 10.0))
    grown = graphed.memory["activations and gradients"] - bare.memory["activations and gradients"]
    assert bare.memory["activations and gradients"] == pytest.approx(beside + grads)
    assert grown == pytest.approx(15 * 3 * 10 * 1024)
    assert estimate(job, gpipe, dataclasses.replace(cluster, graph_kb=10.0)).device_bytes == est.device_bytes


def test_a_checkpointed_backward_recomputes_a_layer_beside_the_later_layers_gradients():
    # one micro-batch, checkpointed: no other micro-batch's activations live beside the gradients,
    # but the first layer is recomputed when the later layers' gradients are all made
    from core.autoparallel.estimate import rank_sums

    h, s, v = 256, 16, 256
    job = _toy_job(layers=4, hidden=h, heads=4, seq=s, vocab=v, batch=2)
    cluster = Cluster(nodes=1, devices_per_node=1, device_memory_gb=4.0, nvme_gb=0)
    (rank,) = rank_sums(job.profile, 1, 1)
    tokens = 2 * s
    lay = Layout(micro_batch=2, microbatches=1, checkpointing=True)
    recomputed = (rank.top_split + rank.top_whole) * tokens
    kept = (rank.kept_boundary + rank.edge_split + rank.edge_whole) * tokens
    acts = kept + max(recomputed, 2 * tokens * v * 4)            # the loss's gradients at backward's start
    grads = 4 * rank.trained + 2 * 4 * job.profile.largest
    assert grads + recomputed > acts                              # the gradients, not the activations, set the peak
    assert estimate(job, lay, cluster).memory["activations and gradients"] == pytest.approx(grads + recomputed)
    # without checkpointing, backward frees each layer's activations as it makes its gradients
    plain = estimate(job, dataclasses.replace(lay, checkpointing=False), cluster)
    whole = (rank.act_split + rank.act_whole) * tokens + 2 * tokens * v * 4
    assert plain.memory["activations and gradients"] == pytest.approx(max(whole, grads))


def test_a_chunk_s_reduction_frees_only_its_own_micro_batch_s_activations():
    # ZeRO in a GPipe pipeline: a stage in one chunk reduces (and, from the second micro-batch on,
    # adds to the earlier sum) when its micro-batch's backward ends, with the other micro-batches'
    # activations still kept: the sum counts beyond them where it outgrows one micro-batch's share
    job = dataclasses.replace(_toy_job(layers=2, hidden=256, heads=4, seq=16, vocab=256, batch=16), chunk_mb=64.0)
    cluster = dataclasses.replace(CLUSTERS["4 devices, roomy"], device_is_host=True)
    lay = Layout(pp=2, pp_schedule="gpipe", micro_batch=1, microbatches=16, zero=3, offload="cpu")
    est = estimate(job, lay, cluster)
    T = est.memory["weights"] / 4                                        # the stage's parameters, all trained
    one_mb = est.memory["activations"] / 16
    assert est.memory["reduction buffers"] == pytest.approx(max(4 * T - one_mb, 0.0))
    assert est.memory["reduction buffers"] > 0
    single = estimate(job, dataclasses.replace(lay, micro_batch=16, microbatches=1), cluster)
    assert single.memory.get("reduction buffers", 0.0) == 0.0        # dp 1, one micro-batch: nothing to add


def test_a_pipeline_over_zero_1_2_chunks_on_the_device_reduces_once_a_step_after_its_activations():
    # no offload: every chunk's gradients add up in its buffer across the micro-batches and are
    # reduced once, by the stage's last backward, when the other micro-batches' activations are gone
    from core.autoparallel.estimate import gloo_reduce_scatter

    job = dataclasses.replace(_toy_job(layers=2, hidden=256, heads=4, seq=16, vocab=256, batch=16), chunk_mb=64.0)
    cluster = dataclasses.replace(CLUSTERS["4 devices, roomy"], device_is_host=True)
    lay = Layout(dp=2, pp=2, pp_schedule="gpipe", micro_batch=1, microbatches=8, zero=2)
    est = estimate(job, lay, cluster)
    T = est.memory["weights"] / 4                                        # one chunk: the stage
    assert est.memory["gradient buffers"] == 4 * T
    collective = 4 * T / 2 + gloo_reduce_scatter(2, 4 * T)             # the shard, gloo's copy and scratch
    assert est.memory["reduction buffers"] == pytest.approx(max(collective - est.memory["activations"], 0.0))
    # with host offload each micro-batch reduces (and adds to the earlier sum) beside the others' activations
    each = estimate(job, dataclasses.replace(lay, offload="cpu"), cluster)
    one_mb = each.memory["activations"] / 8
    assert each.memory["reduction buffers"] == pytest.approx(max(collective - one_mb, 0.0))


def test_zero_1_2_over_nvme_on_the_host_rebuilds_each_chunk_in_the_step():
    # the step reads a chunk's states, then all-gathers the new shards into the whole chunk (and
    # gloo copies it) before writing it home; ZeRO-3 writes its shard alone
    from core.autoparallel.estimate import GLOO_ALL_GATHER

    job = dataclasses.replace(_toy_job(layers=2, hidden=128, heads=4, seq=16, vocab=256, batch=16), chunk_mb=64.0)
    host = Cluster(nodes=1, devices_per_node=4, device_memory_gb=4, nvme_gb=10, device_is_host=True)
    lay = Layout(dp=4, micro_batch=1, microbatches=4, zero=1, offload="nvme")
    one, three = (estimate(job, dataclasses.replace(lay, zero=z), host).memory for z in (1, 3))
    P = job.profile.params
    transit = (4 + 8 + 4) * P / 4                                       # master, moments, gradient shards
    backward = sum(one[k] for k in ("weights", "gradient buffers", "activations", "reduction buffers"))
    assert one["host copies"] == pytest.approx(max(transit + 4 * P * (1 + GLOO_ALL_GATHER) - backward, 0.0))
    assert one["host copies"] > 0
    backward3 = sum(three[k] for k in ("weights", "gradient buffers", "activations", "reduction buffers"))
    assert three["host copies"] == pytest.approx(max(transit - backward3, 0.0))


def test_an_interleaved_stage_s_chunk_frees_only_a_virtual_stage_s_share_when_it_reduces():
    # the rank's chunk completes with its last virtual stage's backward, the other micro-batches'
    # forwards having kept the activations near their peak: a v-th of a micro-batch is freed
    job = dataclasses.replace(_toy_job(layers=8, hidden=256, heads=4, seq=16, vocab=256, batch=16), chunk_mb=64.0)
    cluster = dataclasses.replace(CLUSTERS["4 devices, roomy"], device_is_host=True)
    lay = Layout(pp=2, pp_schedule="interleaved", virtual_stages=4, micro_batch=1, microbatches=8, zero=3,
                 offload="cpu")
    est = estimate(job, lay, cluster)
    T = est.memory["weights"] / 4                                        # one chunk: the rank's stages
    one_mb = est.memory["activations"] / (2 + 1 / 4)                     # p + (p - 1) / v in flight
    assert est.memory["reduction buffers"] == pytest.approx(max(4 * T - one_mb / 4, 0.0))
    flat = estimate(job, dataclasses.replace(lay, pp_schedule="1f1b", virtual_stages=1), cluster)
    T = flat.memory["weights"] / 4
    assert flat.memory["reduction buffers"] == pytest.approx(max(4 * T - flat.memory["activations"] / 2, 0.0))

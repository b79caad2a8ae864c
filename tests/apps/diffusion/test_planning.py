"""The diffusion app's planning target: its step profiled on the meta device as a real step runs
it, what each fine-tuning method trains, and plans the app can run."""

import dataclasses

import pytest
import torch
import yaml

from apps.diffusion.config import DiffusionRecipe
from apps.diffusion.planning import TARGET, _modules, _Step, profile
from core.autoparallel import Cluster, best_plan, estimate
from core.autoparallel.profile import Segments, _Saved
from core.autoparallel.target import job_for, target_for
from core.config import load_recipe


def _cfg(*extra: str) -> DiffusionRecipe:
    return load_recipe(DiffusionRecipe, "diffusion/tiny-shapes", list(extra))


def test_the_step_profile_is_what_a_real_step_keeps():
    cfg = _cfg()
    prof = profile(cfg)
    vae, text, unet = prof.layers
    assert [layer.name for layer in prof.layers] == ["vae", "text_encoder", "unet"] and prof.unit == "samples"
    # the VAE and the text encoder are frozen and nothing trained precedes them: no backward, nothing kept
    assert (vae.trained_params, text.trained_params, vae.backward_flops, text.backward_flops) == (0, 0, 0.0, 0.0)
    assert vae.act_split + vae.act_whole == 0 and unet.trained_params == unet.params
    assert 1.5 <= unet.backward_flops / unet.flops <= 2.5
    # the same step on real tensors, through the same hooks, keeps the same bytes (the loss's, an
    # MSE's operands, with the UNet's); with the UNet's real (non-reentrant) checkpointing on, what
    # autograd keeps outside the checkpointed blocks is what the profile says stays outside them
    torch.manual_seed(0)
    text_encoder, vae_m, unet_m, tokens = _modules(cfg)
    vae_m.requires_grad_(False)
    text_encoder.requires_grad_(False)
    step = _Step(text_encoder, vae_m, unet_m, 1, tokens, cfg.data.resolution, False)
    params = {id(p) for p in step.parameters()}
    segments = Segments()
    unet_m.enable_gradient_checkpointing(segments.run)
    x = step._text(step._encode(None))
    saved = _Saved(params, int(unet_m.config.block_out_channels[0]))
    segments.reset(saved)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        pred = step._denoise(x)
    loss = _Saved(params, int(unet_m.config.block_out_channels[0]))
    with torch.autograd.graph.saved_tensors_hooks(loss.pack, loss.unpack):
        torch.nn.functional.mse_loss(pred, torch.zeros_like(pred))
    kept_by_loss = loss.split + loss.whole
    assert kept_by_loss > 0
    assert saved.split + saved.whole + kept_by_loss == unet.act_split + unet.act_whole
    assert segments.count > 0 and unet.act_checkpointed == segments.kept() + kept_by_loss

    unet_m.enable_gradient_checkpointing()                   # torch.utils.checkpoint, as a real run
    real = _Saved(params, int(unet_m.config.block_out_channels[0]))
    with torch.autograd.graph.saved_tensors_hooks(real.pack, real.unpack):
        step._denoise(x)
    # at the end of the forward: what the profile says, but the largest block's tensors, which
    # exist only while that block is recomputed in backward
    assert real.split + real.whole == segments.kept() - segments.largest
    assert segments.largest > 0 and unet.act_checkpointed < 0.5 * (unet.act_split + unet.act_whole)


def test_each_method_trains_what_the_app_trains():
    full, lora = profile(_cfg()), profile(_cfg("finetune.method=lora"))
    assert lora.trained_params < full.trained_params / 20          # the adapters alone
    assert lora.layers[-1].backward_flops < 0.6 * full.layers[-1].backward_flops
    booth = profile(_cfg("finetune.method=dreambooth", "finetune.prior_loss_weight=1.0", "data.instance_dir=subject",
                         "data.instance_prompt=a photo of sks dog", "data.class_prompt=a photo of a dog"))
    assert booth.layers[-1].flops == pytest.approx(2 * full.layers[-1].flops)      # a class image beside each
    assert target_for("diffusion/tiny-shapes") is TARGET


def test_a_plan_for_the_diffusion_app_runs_as_the_app_runs(tmp_path):
    from core.plan import main

    cfg = _cfg("train.micro_batch=4")
    job = job_for(TARGET, cfg, 4)
    assert job.axes == ("dp",) and job.max_zero == 2                  # validation renders on rank 0 alone
    plan = best_plan(job, Cluster(nodes=1, devices_per_node=4, device_memory_gb=2), top=50)
    assert all(e.layout.devices == e.layout.dp and e.layout.zero < 3 for e in plan.result.ranked)
    quiet = dataclasses.replace(cfg, validation=dataclasses.replace(cfg.validation, prompts=[]))
    assert job_for(TARGET, quiet, 4).max_zero == 3
    # a device too small for the loose pick's activations: the UNet's checkpointing comes on
    small = Cluster(nodes=1, devices_per_node=4, device_memory_gb=0.012, nvme_gb=0)
    assert not estimate(job, plan.best.layout, small).fits and not plan.best.layout.checkpointing
    tight = best_plan(job, small, top=1).best
    assert tight.layout.checkpointing and tight.device_bytes <= 0.012 * 2**30
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"devices_per_node": 4, "device_memory_gb": 2}))
    out = tmp_path / "plan.yaml"
    assert main(["--recipe", "diffusion/tiny-shapes", "--cluster", str(tmp_path / "c.yaml"), "--out", str(out)]) == 0
    written = yaml.safe_load(out.read_text())
    assert written["extends"] == "diffusion/tiny-shapes" and written["parallel"]["dp"] == 4
    assert "gradient_checkpointing" in written["model"]
    planned = load_recipe(DiffusionRecipe, str(out))
    assert planned.parallel.dp == 4 and planned.model.pretrained == "tiny"


def test_a_pipeline_folder_is_profiled_from_its_configurations(tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from apps.diffusion.shapes import WORDS
    from apps.diffusion.tiny import MAX_TOKENS, tiny_modules
    from apps.diffusion.tokenizer import write_clip_tokenizer

    cfg = _cfg()
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path / "vocab", WORDS)),
                                              model_max_length=MAX_TOKENS)
    text, vae, unet = tiny_modules(cfg.data.resolution, cfg.model.tiny_width, tokenizer)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=DDPMScheduler(),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "sd")
    from_folder = profile(_cfg(f"model.pretrained={tmp_path / 'sd'}"))
    from_code = profile(cfg)
    assert from_folder.layers == from_code.layers

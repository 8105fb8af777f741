"""Train the shapes teacher and write it as a diffusers Stable Diffusion folder.

    python -m swiftbrush_jax.toy.make_teacher --out swiftbrush_jax/toy/teacher

Stage 1 trains the VAE, stage 2 the UNet and text encoder on its latents
(swiftbrush_jax.toy.teacher_training), stage 3 the world's own CLIP for
SwiftBrush v2's CLIP loss, written to <out>/clip/ as a transformers
``CLIPModel`` folder (diffusers ignores it: it is not in model_index.json). The folder loads with
``pipeline.load_pipeline`` and with diffusers' ``StableDiffusionPipeline``.
A stage whose component folders already exist in --out is kept instead of
retrained, so an interrupted run resumes at the stage it was in. The result
is a deterministic function of the seeds below (on one platform).
With --snapshot-every N, the UNet stage writes its EMA so far every N steps
to <out>/snapshot/, a complete diffusers folder that evaluate can score while
training goes on. Cost of the shipped teacher: docs/shapes.md.
"""

import argparse
import dataclasses
import os
import time

import jax.numpy as jnp
import numpy as np

from ..files import diffusers_writer as dio
from ..models.text_encoder import CLIPTextConfig, CLIPTextModel
from ..models.clip import CLIPModel, CLIPVisionConfig, clip_pixels, cosine
from ..models.unet import UNet2DConditionModel, UNetConfig, unet_config_to_diffusers
from ..models.vae import AutoencoderKL, VAEConfig, load_vae
from ..files.pipeline import load_tokenizer
from ..schedule import NoiseSchedule
from ..files.weights import params_to_state_dict, save_state_dict
from . import shapes
from . import teacher_arch as arch
from .teacher_training import (StageConfig, caption_rows, encode_dataset, finetune_decoder, init_params,
                               latent_scaling_factor, to_signed, train_clip, train_denoiser, train_vae)

VAE_STAGE = StageConfig(steps=1000, batch_size=16, lr=1e-3, warmup_steps=50, seed=1)
DECODER_STAGE = StageConfig(steps=600, batch_size=16, lr=1e-3, warmup_steps=20, seed=4)
VAE_KL_WEIGHT = 1e-4  # per latent element, against a per-pixel L1: keeps the posterior nearly deterministic
DENOISER_STAGE = StageConfig(steps=5000, batch_size=64, lr=1e-3, warmup_steps=200, seed=2)
DENOISER_EMA = 0.999
CLIP_STAGE = StageConfig(steps=2000, batch_size=128, lr=1e-3, warmup_steps=100, seed=5)
CLIP_FOLDER = "clip"
TRAIN_IMAGES, TRAIN_IMAGES_SEED = 32768, 3
INIT_SEED = 0


def write_tokenizer(out: str) -> tuple:
    """The teacher's BPE tokenizer (teacher_arch); returns the token ids of every caption and of "", and its size."""
    folder = os.path.join(out, "tokenizer")
    merges = [tuple(m.split(" ")) for m in arch.TOKENIZER_MERGES]
    tokens = (list(dio.CLIP_SPECIALS) + list(arch.TOKENIZER_ALPHABET)
              + [c + "</w>" for c in arch.TOKENIZER_WORD_FINALS] + [a + b for a, b in merges])
    dio.write_bpe_tokenizer(folder, tokens, merges, arch.MAX_TOKENS)
    tokenizer = load_tokenizer(folder)
    prompts = shapes.all_prompts() + [""]
    return tokenizer(prompts, padding="max_length", max_length=arch.MAX_TOKENS, truncation=True).input_ids, len(tokenizer)


def vae_config() -> VAEConfig:
    return VAEConfig.from_diffusers(arch.VAE)


def unet_config() -> UNetConfig:
    return UNetConfig.from_diffusers(arch.UNET)


def text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1, **arch.TEXT)


def make_vae(out: str, vae_steps: int, decoder_steps: int):
    """Stage 1 (VAE, then its decoder alone), or the VAE already in --out; returns (module, params)."""
    folder = os.path.join(out, "vae")
    if os.path.exists(os.path.join(folder, "config.json")):
        print(f"[vae] reusing {folder}", flush=True)
        return load_vae(folder)
    config = vae_config()
    vae = AutoencoderKL(config)
    params = init_params(vae, INIT_SEED, jnp.zeros((1, arch.IMAGE_PX, arch.IMAGE_PX, 3)))
    params = train_vae(vae, params, dataclasses.replace(VAE_STAGE, steps=vae_steps), VAE_KL_WEIGHT, arch.IMAGE_PX)
    images, _, _ = shapes.sample_dataset(1024, TRAIN_IMAGES_SEED + 1, arch.IMAGE_PX)
    means, _ = encode_dataset(vae, params, images)
    config = dataclasses.replace(config, scaling_factor=latent_scaling_factor(means))
    params = finetune_decoder(vae, params, dataclasses.replace(DECODER_STAGE, steps=decoder_steps), arch.IMAGE_PX)
    dio.write_component(folder, config.to_diffusers(), params, dio.UNET_WEIGHTS)
    return AutoencoderKL(config), params


def write_denoiser(out: str, text_config, unet_config, params) -> None:
    """text_encoder/ and unet/ of a diffusers folder."""
    dio.write_component(os.path.join(out, "text_encoder"), text_config.to_transformers(), params["text"],
                        dio.TEXT_WEIGHTS)
    dio.write_component(os.path.join(out, "unet"), unet_config_to_diffusers(unet_config), params["unet"],
                        dio.UNET_WEIGHTS)


def write_snapshot(out: str, text_config, unet_config, step: int, params) -> None:
    """<out>/snapshot/: the denoiser so far beside links to the finished parts, a folder evaluate can load."""
    folder = os.path.join(out, "snapshot")
    os.makedirs(folder, exist_ok=True)
    for part in ("vae", "tokenizer"):
        if not os.path.exists(os.path.join(folder, part)):
            os.symlink(os.path.abspath(os.path.join(out, part)), os.path.join(folder, part))
    dio.write_scheduler(folder, arch.SCHEDULER)
    write_denoiser(folder, text_config, unet_config, params)
    dio.write_model_index(folder, "DDPMScheduler")
    print(f"[unet] snapshot of step {step} in {folder}", flush=True)


def make_denoiser(out: str, vae, vae_params, token_ids, vocab_size: int, unet_steps: int,
                  snapshot_every: int = 0) -> None:
    """Stage 2: trains and writes unet/ and text_encoder/, unless --out already holds both."""
    if all(os.path.exists(os.path.join(out, part, "config.json")) for part in ("unet", "text_encoder")):
        print(f"[unet] reusing {out}/unet and {out}/text_encoder", flush=True)
        return
    images, _, attributes = shapes.sample_dataset(TRAIN_IMAGES, TRAIN_IMAGES_SEED, arch.IMAGE_PX)
    means, stds = encode_dataset(vae, vae_params, images)
    scale = vae.config.scaling_factor
    rows = caption_rows(attributes, shapes.all_prompts())

    text = text_config(vocab_size)
    text_encoder = CLIPTextModel(text)
    unet_arch = unet_config()
    unet = UNet2DConditionModel(unet_arch)
    params = {
        "text": init_params(text_encoder, INIT_SEED + 1, jnp.zeros((1, arch.MAX_TOKENS), jnp.int32)),
        "unet": init_params(unet, INIT_SEED + 2, jnp.zeros((1, arch.LATENT_PX, arch.LATENT_PX, unet_arch.in_channels)),
                            jnp.zeros((1,), jnp.int32), jnp.zeros((1, arch.MAX_TOKENS, arch.TEXT["hidden_size"]))),
    }
    schedule = NoiseSchedule.from_config(arch.SCHEDULER)
    stage = dataclasses.replace(DENOISER_STAGE, steps=unet_steps)
    snapshot = lambda step, ema: write_snapshot(out, text, unet_arch, step, ema)
    ema = train_denoiser(unet, text_encoder, params, (means * scale, stds * scale), rows,
                         np.asarray(token_ids, np.int32), schedule, stage, DENOISER_EMA,
                         on_snapshot=snapshot, snapshot_every=snapshot_every)
    write_denoiser(out, text, unet_arch, ema)


def clip_config(vocab_size: int) -> dict:
    """The world's CLIP as transformers' CLIPModel config.json."""
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": arch.CLIP_PROJECTION,
            "logit_scale_init_value": 2.6592, "text_config": text_config(vocab_size).to_transformers(),
            "vision_config": {"model_type": "clip_vision_model", "projection_dim": arch.CLIP_PROJECTION,
                              **arch.CLIP_VISION}}


def clip_zero_shot(model, params, token_ids, n: int = 1024, seed: int = 77) -> dict:
    """The CLIP on n held-out renders: how often its nearest fully specified prompt is the image's own, and
    the mean cosine with the image's own prompt and with the nearest wrong one."""
    prompts = shapes.all_prompts()
    specified = [prompts.index(p) for p in shapes.specified_prompts()]
    images, _, attributes = shapes.sample_dataset(n, seed, arch.IMAGE_PX)
    own = caption_rows(attributes, prompts)[:, 0]
    pixels = clip_pixels(jnp.asarray(to_signed(images)), model.vision_config.image_size)
    image, text = model.apply({"params": params}, pixels, jnp.asarray(np.asarray(token_ids)[specified]))
    cos = np.array(cosine(image[:, None, :], text[None, :, :]))  # (n, 18)
    own_column = np.array([specified.index(i) for i in own])
    own_cos = cos[np.arange(n), own_column]
    cos[np.arange(n), own_column] = -np.inf
    return {"zero_shot_accuracy": float(np.mean(own_cos > cos.max(1))), "own_prompt_cosine": float(own_cos.mean()),
            "nearest_wrong_cosine": float(cos.max(1).mean())}


def make_clip(out: str, token_ids, vocab_size: int, steps: int) -> None:
    """Stage 3: trains and writes <out>/clip/, unless it exists."""
    folder = os.path.join(out, CLIP_FOLDER)
    if os.path.exists(os.path.join(folder, "config.json")):
        print(f"[clip] reusing {folder}", flush=True)
        return
    config = clip_config(vocab_size)
    vision = CLIPVisionConfig.from_transformers(config["vision_config"])
    model = CLIPModel(text_config(vocab_size), vision, arch.CLIP_PROJECTION)
    pixels = jnp.zeros((1, arch.IMAGE_PX, arch.IMAGE_PX, 3))
    params = {"model": init_params(model, INIT_SEED + 3, pixels, jnp.zeros((1, arch.MAX_TOKENS), jnp.int32)),
              "logit_scale": jnp.float32(config["logit_scale_init_value"])}
    params = train_clip(model, params, np.asarray(token_ids, np.int32), dataclasses.replace(CLIP_STAGE, steps=steps),
                        arch.IMAGE_PX)
    print(f"[clip] held-out renders: {clip_zero_shot(model, params['model'], token_ids)}", flush=True)
    state = {**params_to_state_dict(params["model"]), "logit_scale": np.asarray(params["logit_scale"], np.float32)}
    os.makedirs(folder, exist_ok=True)
    dio.write_json(os.path.join(folder, "config.json"), config)
    save_state_dict(state, os.path.join(folder, dio.TEXT_WEIGHTS))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="diffusers folder to write")
    parser.add_argument("--vae-steps", type=int, default=VAE_STAGE.steps)
    parser.add_argument("--decoder-steps", type=int, default=DECODER_STAGE.steps)
    parser.add_argument("--unet-steps", type=int, default=DENOISER_STAGE.steps)
    parser.add_argument("--clip-steps", type=int, default=CLIP_STAGE.steps)
    parser.add_argument("--snapshot-every", type=int, default=0,
                        help="write the UNet stage's EMA so far to <out>/snapshot/ every N steps (0: never)")
    args = parser.parse_args(argv)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    token_ids, vocab_size = write_tokenizer(args.out)
    vae, vae_params = make_vae(args.out, args.vae_steps, args.decoder_steps)
    make_denoiser(args.out, vae, vae_params, token_ids, vocab_size, args.unet_steps, args.snapshot_every)
    make_clip(args.out, token_ids, vocab_size, args.clip_steps)
    dio.write_scheduler(args.out, arch.SCHEDULER)
    dio.write_model_index(args.out, "DDPMScheduler")
    print(f"wrote {args.out} in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""A tiny random SD-2.1-shaped pipeline (models.presets' TINY_*), written in diffusers format, for smoke runs
on a CPU."""

import os
import shutil

import jax
import jax.numpy as jnp

from ..files import diffusers_writer as dio
from ..models.text_encoder import CLIPTextConfig, CLIPTextModel
from ..models.unet import UNet2DConditionModel, UNetConfig, unet_config_to_diffusers
from ..models.presets import DDPM_SCHEDULER, TINY_CORPUS, TINY_TEXT, TINY_UNET, TINY_VAE
from ..models.vae import AutoencoderKL, VAEConfig



def _init(module, rng, *inputs):
    return jax.jit(module.init)(rng, *inputs)["params"]


def make_tiny_pipeline(out_dir: str, seed: int = 0) -> str:
    """Write (once) and return a tiny random diffusers SD pipeline folder."""
    if os.path.exists(os.path.join(out_dir, "model_index.json")):
        return out_dir
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    vocab = dio.write_clip_tokenizer(os.path.join(tmp, "tokenizer"), TINY_CORPUS)
    k_unet, k_vae, k_text = jax.random.split(jax.random.PRNGKey(seed), 3)

    # write_clip_tokenizer puts its two special tokens last: start, then end (also padding).
    text_cfg = CLIPTextConfig(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                              **TINY_TEXT)
    text_params = _init(CLIPTextModel(text_cfg), k_text, jnp.zeros((1, 77), jnp.int32))
    dio.write_component(os.path.join(tmp, "text_encoder"), text_cfg.to_transformers(), text_params, dio.TEXT_WEIGHTS)

    vae_cfg = VAEConfig.from_diffusers(TINY_VAE)
    vae_params = _init(AutoencoderKL(vae_cfg), k_vae, jnp.zeros((1, 16, 16, 3)))
    dio.write_component(os.path.join(tmp, "vae"), vae_cfg.to_diffusers(), vae_params, dio.UNET_WEIGHTS)

    unet_cfg = UNetConfig.from_diffusers(TINY_UNET)
    unet_params = _init(UNet2DConditionModel(unet_cfg), k_unet, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                        jnp.zeros((1, 77, 32)))
    dio.write_component(os.path.join(tmp, "unet"), unet_config_to_diffusers(unet_cfg), unet_params, dio.UNET_WEIGHTS)

    dio.write_scheduler(tmp, DDPM_SCHEDULER)
    dio.write_model_index(tmp, "DDPMScheduler")
    os.replace(tmp, out_dir)
    return out_dir

"""A tiny random SD-2.1-shaped pipeline, written in diffusers format, for smoke runs on a CPU.

It exercises every code path of a real teacher (per-block head counts, dense
projections, gelu text encoder, DDPM schedule) at a size that trains in seconds.
"""

import os
import shutil

import jax
import jax.numpy as jnp

from ..files import diffusers_writer as dio
from ..models.text_encoder import CLIPTextConfig, CLIPTextModel
from ..models.unet import UNet2DConditionModel, UNetConfig, unet_config_to_diffusers
from ..models.vae import AutoencoderKL, VAEConfig

# The SD 2.1 scheduler (DDPM, scaled_linear 0.00085..0.012, 1000 steps, epsilon).
SD21_SCHEDULER = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
}
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4), cross_attention_dim=32, use_linear_projection=True, norm_num_groups=8,
    flip_sin_to_cos=True, freq_shift=0,
)
TINY_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act="gelu", max_position_embeddings=77, projection_dim=32)
CORPUS = ["a photo of a cat", "a painting of a lighthouse at dusk", "an astronaut riding a horse",
          "a bowl of fruit on a table"] + [f"a {c} {s}" for c in ("red", "green", "blue", "yellow", "magenta", "cyan")
                                           for s in ("circle", "square", "triangle")]


def _init(module, rng, *inputs):
    return jax.jit(module.init)(rng, *inputs)["params"]


def make_tiny_pipeline(out_dir: str, seed: int = 0) -> str:
    """Write (once) and return a tiny random diffusers SD pipeline folder."""
    if os.path.exists(os.path.join(out_dir, "model_index.json")):
        return out_dir
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    vocab = dio.write_clip_tokenizer(os.path.join(tmp, "tokenizer"), CORPUS)
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

    dio.write_scheduler(tmp, SD21_SCHEDULER)
    dio.write_model_index(tmp, "DDPMScheduler")
    os.replace(tmp, out_dir)
    return out_dir

"""Generation, the one place for each computation: guidance, the one-step generator, DDIM, VAE decoding.

The trainer's step and sampler, ``sample``, ``evaluate`` and ``export`` all
build their images from these functions (docs/method.md §2, §3).
"""

import jax.numpy as jnp
import numpy as np

from . import schedule as sched
from .models.conditioning import apply_unet, uncond_then_cond

# Defaults of a diffusers folder sampled as the teacher: diffusers' StableDiffusionPipeline's own.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5


def guided(unet, variables, x, t, cond, uncond, scale: float):
    """Classifier-free guidance: net(x, t, "") + scale * (net(x, t, c) - net(x, t, "")), float32.

    The two halves run as one batched call; at scale 1 the formula is the conditional output, so only
    that half runs. ``cond`` and ``uncond`` (one row) are conditionings of either kind (models.conditioning)."""
    if scale == 1.0:
        return apply_unet(unet, variables, x, t, cond).astype(jnp.float32)
    out = apply_unet(unet, variables, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                     uncond_then_cond(uncond, cond))
    out_uncond, out_cond = jnp.split(out.astype(jnp.float32), 2)
    return out_uncond + scale * (out_cond - out_uncond)


def one_step_x0(unet, variables, z, cond, schedule, t: int, output_is_x0: bool = False):
    """The one-step generator: the clean latent x0 from one UNet call on pure noise z at timestep t.

    ``variables`` are the UNet's flax variables: {"params": ...}, with a "lora" collection for a LoRA
    student. The output is a prediction of the schedule's type turned into x0 (the x0 parameterisation),
    or, for the paper's ablation that drops it, taken as x0 itself (``output_is_x0``)."""
    timesteps = jnp.full((z.shape[0],), t, jnp.int32)
    out = apply_unet(unet, variables, z, timesteps, cond).astype(jnp.float32)
    return out if output_is_x0 else sched.to_x0(schedule, out, z, timesteps)


def decode_to_pixels(vae, vae_params, latents):
    """VAE-decode latents (unscaled by the VAE's scaling factor) to float images in [0, 1], NHWC."""
    image = vae.apply({"params": vae_params}, latents / vae.config.scaling_factor, method=vae.decode)
    return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def one_step_images(unet, vae, schedule, t: int, output_is_x0: bool = False):
    """(unet variables, vae params, z, cond) -> float images in [0, 1]: ``one_step_x0`` decoded; jit it."""

    def sample(unet_variables, vae_params, z, cond):
        return decode_to_pixels(vae, vae_params, one_step_x0(unet, unet_variables, z, cond, schedule, t,
                                                             output_is_x0))

    return sample


def ddim_images(unet, vae, schedule, num_steps: int, guidance: float):
    """(unet params, vae params, z, cond, uncond) -> float images in [0, 1]: multi-step DDIM; jit it.

    DDIM (eta 0) following the scheduler config, with classifier-free guidance against ``uncond``
    (the empty prompt's conditioning, one row) as diffusers' StableDiffusionPipeline does it: guidance <= 1
    runs the conditional branch alone."""

    def sample(unet_params, vae_params, z, cond, uncond):
        def denoise(x, t):
            return guided(unet, {"params": unet_params}, x, t, cond, uncond, max(guidance, 1.0))

        return decode_to_pixels(vae, vae_params, sched.ddim_sample(denoise, z, schedule, num_steps))

    return sample


def to_uint8(images) -> np.ndarray:
    """Round to 8 bits the way diffusers' ``numpy_to_pil`` does."""
    return (np.asarray(images) * 255).round().astype(np.uint8)


def image_grid(images: np.ndarray, cols: int) -> np.ndarray:
    """Tile (N, H, W, C) images into one (rows*H, cols*W, C) image, padding with black."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, c), images.dtype)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid


def upscaled(images: np.ndarray, min_px: int) -> np.ndarray:
    """(N, H, W, C) images enlarged for viewing by the smallest whole factor that brings both sides to at least
    ``min_px``, nearest-neighbour (each pixel a k x k block, no new values); unchanged when already that
    large or for ``min_px`` 0."""
    k = -(-min_px // min(images.shape[1:3])) if min_px > 0 else 1
    return images if k <= 1 else images.repeat(k, axis=1).repeat(k, axis=2)

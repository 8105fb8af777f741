"""One-step generation with a SwiftBrush student, and VAE decoding to pixels."""

import jax
import jax.numpy as jnp
import numpy as np

from . import schedule as sched


def one_step_x0(unet, params, z, cond, schedule, t: int):
    """The student's sample: x0 predicted from pure noise z at timestep t (T - 1)."""
    timesteps = jnp.full((z.shape[0],), t, jnp.int32)
    out = unet.apply({"params": params}, z, timesteps, cond).astype(jnp.float32)
    return sched.to_x0(schedule, out, z, timesteps)


def decode_to_pixels(vae, vae_params, latents):
    """VAE-decode latents (unscaled by the VAE's scaling factor) to float images in [0, 1], NHWC."""
    image = vae.apply({"params": vae_params}, latents / vae.config.scaling_factor, method=vae.decode)
    return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


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


def make_sampler(student_unet, vae, schedule, t: int):
    """A jitted (student params, vae params, z, cond) -> float images function."""

    @jax.jit
    def sample(student_params, vae_params, z, cond):
        return decode_to_pixels(vae, vae_params, one_step_x0(student_unet, student_params, z, cond, schedule, t))

    return sample


def make_ddim_sampler(unet, vae, schedule, num_steps: int, guidance: float):
    """A jitted (unet params, vae params, z, cond, uncond) -> float images function.

    Multi-step DDIM (eta 0) following the scheduler config, with classifier-free
    guidance against ``uncond`` (1, T, D) as diffusers' StableDiffusionPipeline
    does it: guidance <= 1 runs the conditional branch alone.
    """

    @jax.jit
    def sample(unet_params, vae_params, z, cond, uncond):
        def denoise(x, t):
            if guidance <= 1.0:
                return unet.apply({"params": unet_params}, x, t, cond).astype(jnp.float32)
            ctx = jnp.concatenate([jnp.broadcast_to(uncond, (x.shape[0],) + uncond.shape[1:]), cond])
            out = unet.apply({"params": unet_params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]), ctx)
            out_uncond, out_cond = jnp.split(out.astype(jnp.float32), 2)
            return out_uncond + guidance * (out_cond - out_uncond)

        x0 = sched.ddim_sample(denoise, z, schedule, num_steps)
        return decode_to_pixels(vae, vae_params, x0)

    return sample

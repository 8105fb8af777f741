"""What a UNet is conditioned on, in one type for SD 1.x/2.x and SDXL (docs/sdxl.md).

SD 1.x/2.x UNets attend to the prompt's hidden states alone: there the conditioning is that (B, L, D) array.
SDXL's UNet also takes the pooled text embedding and six micro-conditioning time ids (original size, crop
top-left, target size). ``SDXLConditioning`` carries all three as one pytree, so classifier-free guidance,
prompt dropout and microbatching treat both kinds alike through the functions here, and ``apply_unet`` is
the one place where a conditioning meets the UNet's call signature.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import struct


class SDXLConditioning(struct.PyTreeNode):
    """SDXL's UNet inputs beside the latents: every leaf has the batch on its first axis."""

    context: jax.Array  # (B, L, 2048): both encoders' penultimate hidden states, joined on the last axis
    text_embeds: jax.Array  # (B, 1280): text_encoder_2's projected pooled embedding
    time_ids: jax.Array  # (B, 6): original (h, w), crop (top, left), target (h, w), in pixels


def time_ids(image_size: Sequence[int], batch: int) -> jax.Array:
    """diffusers' ``StableDiffusionXLPipeline`` default micro-conditioning for (h, w) pixels: the original and
    target sizes both the image's, crops (0, 0)."""
    h, w = image_size
    return jnp.tile(jnp.asarray([[h, w, 0, 0, h, w]], jnp.float32), (batch, 1))


def apply_unet(unet, variables, x, t, cond: Any, **kwargs):
    """``unet.apply`` on a conditioning of either kind."""
    if isinstance(cond, SDXLConditioning):
        return unet.apply(variables, x, t, cond.context, text_embeds=cond.text_embeds, time_ids=cond.time_ids,
                          **kwargs)
    return unet.apply(variables, x, t, cond, **kwargs)


def rows(cond: Any) -> int:
    return jax.tree_util.tree_leaves(cond)[0].shape[0]


def broadcast_rows(cond: Any, batch: int) -> Any:
    """A one-row conditioning (the empty prompt's) repeated to ``batch`` rows."""
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:]), cond)


def uncond_then_cond(uncond: Any, cond: Any) -> Any:
    """The batch of a guided call: the empty prompt's rows, then the prompts' (``generate.guided``)."""
    return jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c]), broadcast_rows(uncond, rows(cond)), cond)


def where_dropped(drop: jax.Array, uncond: Any, cond: Any) -> Any:
    """Per row: the empty prompt's conditioning where ``drop`` (B,) is true, else the prompt's."""
    pick = lambda u, c: jnp.where(drop.reshape((-1,) + (1,) * (c.ndim - 1)), u, c)
    return jax.tree_util.tree_map(pick, broadcast_rows(uncond, rows(cond)), cond)


def as_float32(cond: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), cond)
